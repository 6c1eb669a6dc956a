//! The scalar types the reference computes in: `f32` (what the CLI and the mesh comparison use) and
//! `f64` (what the finite-difference gradient checks use, so that their tolerance is tight).
//!
//! The trait lists exactly the operations the reference needs; each maps to the standard library's
//! correctly rounded (or libm-quality) function of the same name, so an `f32` run is what a plain
//! fp32 program computes, operation by operation.

use std::fmt::{Debug, Display};
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

pub trait Real:
    Copy
    + Debug
    + Display
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Send
    + Sync
    + 'static
{
    /// The safetensors dtype name this type is written as.
    const DTYPE_NAME: &'static str;
    fn from_f64(x: f64) -> Self;
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    fn zero() -> Self {
        Self::from_f64(0.0)
    }
    fn one() -> Self {
        Self::from_f64(1.0)
    }
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn neg_infinity() -> Self;
    fn is_finite(self) -> bool;
    fn max(self, other: Self) -> Self;
}

macro_rules! real {
    ($t:ty, $name:literal, $erf:path) => {
        impl Real for $t {
            const DTYPE_NAME: &'static str = $name;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn erf(self) -> Self {
                $erf(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}

real!(f32, "F32", libm::erff);
real!(f64, "F64", libm::erf);
