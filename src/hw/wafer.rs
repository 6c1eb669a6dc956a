//! Wafer-scale engines (`kind = "wafer"`): the PE mesh, PE microarchitecture and fabric, and, for
//! systems (CS-2/CS-3), the perimeter IO ports, MemoryX and SwarmX.

use serde::Deserialize;

use super::load::{decode, kind, HwDoc};
use super::{Check, HwError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshDims {
    /// PEs per row (x, west to east).
    pub width: u32,
    /// PEs per column (y, north to south).
    pub height: u32,
}

impl MeshDims {
    pub fn pes(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// Vector operations a PE executes, each with its own maximum SIMD width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdOp {
    /// fp16 multiply-accumulate (`@fmach`).
    FmacF16,
    /// fp16 inputs, fp32 accumulator (`@fmachs`).
    FmacF16F32,
    /// fp32 multiply-accumulate (`@fmacs`).
    FmacF32,
    /// fp16 add, subtract, multiply, max (`@faddh`, `@fsubh`, `@fmulh`).
    ArithF16,
    /// fp32 add, multiply, scale (`@fadds`, `@fscales`).
    ArithF32,
    /// 16-bit move (`@mov16`).
    Mov16,
    /// 32-bit move (`@mov32`).
    Mov32,
}

impl SimdOp {
    /// SRAM bytes read and written per element (the SIMD datapath reads operands and writes results
    /// through the PE's SRAM ports): an FMAC reads the vector operand and the accumulator and writes
    /// the accumulator; arithmetic reads two operands and writes one; a move reads one and writes one.
    pub fn sram_bytes_per_elem(self) -> (u64, u64) {
        match self {
            SimdOp::FmacF16 => (4, 2),
            SimdOp::FmacF16F32 => (6, 4),
            SimdOp::FmacF32 => (8, 4),
            SimdOp::ArithF16 => (4, 2),
            SimdOp::ArithF32 => (8, 4),
            SimdOp::Mov16 => (2, 2),
            SimdOp::Mov32 => (4, 4),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SimdOp::FmacF16 => "fmac_f16",
            SimdOp::FmacF16F32 => "fmac_f16_f32",
            SimdOp::FmacF32 => "fmac_f32",
            SimdOp::ArithF16 => "arith_f16",
            SimdOp::ArithF32 => "arith_f32",
            SimdOp::Mov16 => "mov_16",
            SimdOp::Mov32 => "mov_32",
        }
    }
}

/// Maximum elements per cycle of each vector operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimdTable {
    pub fmac_f16: u32,
    pub fmac_f16_f32: u32,
    pub fmac_f32: u32,
    pub arith_f16: u32,
    pub arith_f32: u32,
    pub mov_16: u32,
    pub mov_32: u32,
}

impl SimdTable {
    pub fn width(&self, op: SimdOp) -> u32 {
        match op {
            SimdOp::FmacF16 => self.fmac_f16,
            SimdOp::FmacF16F32 => self.fmac_f16_f32,
            SimdOp::FmacF32 => self.fmac_f32,
            SimdOp::ArithF16 => self.arith_f16,
            SimdOp::ArithF32 => self.arith_f32,
            SimdOp::Mov16 => self.mov_16,
            SimdOp::Mov32 => self.mov_32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeSpec {
    pub sram_bytes: u64,
    pub sram_banks: u32,
    /// Bits read per cycle on each of the two read ports.
    pub sram_read_port_bits: u32,
    pub sram_read_ports: u32,
    pub sram_write_port_bits: u32,
    pub sram_write_ports: u32,
    /// SRAM held back for code, stack and runtime buffers; the compiler never allocates it.
    pub code_reserve_bytes: u64,
    /// Cycles from a task becoming ready to its first instruction (task picker).
    pub pick_cycles: u32,
    pub simd: SimdTable,
}

impl PeSpec {
    /// Elements per cycle of `op`: its SIMD width, limited by what the SRAM ports can read and write.
    /// Returned as (elements, per cycles) so that rates below one element per cycle stay exact.
    pub fn rate(&self, op: SimdOp) -> (u64, u64) {
        let (rd, wr) = op.sram_bytes_per_elem();
        let read_bytes = (self.sram_read_port_bits as u64 * self.sram_read_ports as u64) / 8;
        let write_bytes = (self.sram_write_port_bits as u64 * self.sram_write_ports as u64) / 8;
        let simd = self.simd.width(op) as u64;
        // elements/cycle = min(simd, read_bytes/rd, write_bytes/wr), as an exact fraction.
        let mut best = (simd, 1);
        for (bytes, per) in [(read_bytes, rd), (write_bytes, wr)] {
            // bytes/per < best.0/best.1  <=>  bytes * best.1 < best.0 * per
            if bytes * best.1 < best.0 * per {
                best = (bytes, per);
            }
        }
        best
    }

    /// Cycles to run `elems` elements of `op` (at least one cycle for non-empty work).
    pub fn cycles(&self, op: SimdOp, elems: u64) -> u64 {
        let (n, per) = self.rate(op);
        (elems * per).div_ceil(n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fabric {
    /// Payload bits of one wavelet.
    pub wavelet_bits: u32,
    /// Wavelets per cycle per link direction.
    pub link_wavelets_per_cycle: u32,
    /// Cycles for a wavelet to cross one router-to-router hop.
    pub hop_cycles: u32,
    /// Cycles between a router and its own PE (each way).
    pub ramp_cycles: u32,
    /// Routable colors (virtual channels) per router.
    pub colors: u32,
    /// Wavelets each per-color router input queue holds.
    pub queue_depth: u32,
    /// Extra cycles a train's head pays when a PE relays it (receive, pick, re-send) because the flow
    /// could not get a color of its own.
    pub relay_cycles: u32,
}

/// Where the IO ports sit on the wafer's edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoPlacement {
    /// Half on the west edge, half on the east edge, evenly spaced in rows.
    WestEast,
    /// Evenly spaced around the whole perimeter.
    Perimeter,
    /// All on the west edge.
    West,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoSpec {
    pub ports: u32,
    pub port_bits_per_s: f64,
    pub latency_ns: f64,
    pub placement: IoPlacement,
    /// The system's total IO; the ports together never exceed it.
    pub system_bits_per_s: f64,
}

impl IoSpec {
    /// Bytes per second one port carries, limited by its share of the system total.
    pub fn port_bytes_per_s(&self) -> f64 {
        self.port_bits_per_s.min(self.system_bits_per_s / self.ports as f64) / 8.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryX {
    pub capacity_bytes: f64,
    /// Bytes per second MemoryX can stream to one system.
    pub bytes_per_s: f64,
    /// Adam update rate (parameters per second) of the MemoryX service.
    pub update_params_per_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmX {
    /// Children per broadcast-reduce node.
    pub fanout: u32,
    pub link_bits_per_s: f64,
    /// Latency added per tree level.
    pub hop_latency_ns: f64,
}

/// A wafer, and when it is a system, its IO, MemoryX and SwarmX.
#[derive(Clone, Debug, PartialEq)]
pub struct WaferHw {
    /// The description's name (`wse2`, `cs3`).
    pub name: String,
    pub path: String,
    pub clock_hz: f64,
    pub mesh: MeshDims,
    /// The full mesh of the chip, when `--mesh` selects a smaller rectangle.
    pub full_mesh: MeshDims,
    pub pe: PeSpec,
    pub fabric: Fabric,
    pub io: Option<IoSpec>,
    pub memoryx: Option<MemoryX>,
    pub swarmx: Option<SwarmX>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaferFile {
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    name: Option<String>,
    clock_hz: f64,
    mesh: MeshDims,
    pe: PeSpec,
    fabric: Fabric,
    io: Option<IoSpec>,
    memoryx: Option<MemoryX>,
    swarmx: Option<SwarmX>,
}

impl WaferHw {
    /// Decodes and validates a wafer description (after `extends` and `--set`).
    pub fn from_doc(doc: &HwDoc) -> Result<WaferHw, HwError> {
        let k = kind(doc)?;
        if k != "wafer" {
            return Err(HwError::WrongKind {
                path: doc.path.clone(),
                name: doc.name.clone(),
                found: k,
                wanted: "wafer (wse2, wse3, cs2, cs3)".into(),
            });
        }
        let f: WaferFile = decode(doc, &doc.tree)?;
        let hw = WaferHw {
            name: doc.name.clone(),
            path: doc.path.clone(),
            clock_hz: f.clock_hz,
            mesh: f.mesh,
            full_mesh: f.mesh,
            pe: f.pe,
            fabric: f.fabric,
            io: f.io,
            memoryx: f.memoryx,
            swarmx: f.swarmx,
        };
        hw.validate()?;
        Ok(hw)
    }

    /// Restricts the machine to a `width x height` rectangle of its mesh (`--mesh WxH`).
    pub fn with_mesh(mut self, width: u32, height: u32) -> Result<WaferHw, HwError> {
        let c = Check { path: &self.path };
        c.range_u64("--mesh width", width as u64, 1, self.full_mesh.width as u64)?;
        c.range_u64("--mesh height", height as u64, 1, self.full_mesh.height as u64)?;
        self.mesh = MeshDims { width, height };
        Ok(self)
    }

    /// Peak FLOP/s of the mesh in use for fp16 multiply-accumulate (2 FLOPs per FMAC).
    pub fn peak_flops_per_s(&self) -> f64 {
        let (n, per) = self.pe.rate(SimdOp::FmacF16);
        self.mesh.pes() as f64 * 2.0 * n as f64 / per as f64 * self.clock_hz
    }

    /// Sanity limits: generous for counterfactual sweeps, tight enough to catch typos and units.
    fn validate(&self) -> Result<(), HwError> {
        let c = Check { path: &self.path };
        c.range_f64("clock_hz", self.clock_hz, 1e6, 1e11)?;
        c.range_u64("mesh.width", self.mesh.width as u64, 1, 1 << 16)?;
        c.range_u64("mesh.height", self.mesh.height as u64, 1, 1 << 16)?;
        let pe = &self.pe;
        c.range_u64("pe.sram_bytes", pe.sram_bytes, 1024, 1 << 34)?;
        c.range_u64("pe.sram_banks", pe.sram_banks as u64, 1, 1024)?;
        c.range_u64("pe.sram_read_port_bits", pe.sram_read_port_bits as u64, 8, 4096)?;
        c.range_u64("pe.sram_read_ports", pe.sram_read_ports as u64, 1, 64)?;
        c.range_u64("pe.sram_write_port_bits", pe.sram_write_port_bits as u64, 8, 4096)?;
        c.range_u64("pe.sram_write_ports", pe.sram_write_ports as u64, 1, 64)?;
        c.range_u64("pe.pick_cycles", pe.pick_cycles as u64, 0, 1_000)?;
        if pe.code_reserve_bytes >= pe.sram_bytes {
            return Err(c.err(
                "pe.code_reserve_bytes",
                format!("{} leaves no data SRAM out of pe.sram_bytes = {}", pe.code_reserve_bytes, pe.sram_bytes),
            ));
        }
        let s = &pe.simd;
        for (key, v) in [
            ("pe.simd.fmac_f16", s.fmac_f16),
            ("pe.simd.fmac_f16_f32", s.fmac_f16_f32),
            ("pe.simd.fmac_f32", s.fmac_f32),
            ("pe.simd.arith_f16", s.arith_f16),
            ("pe.simd.arith_f32", s.arith_f32),
            ("pe.simd.mov_16", s.mov_16),
            ("pe.simd.mov_32", s.mov_32),
        ] {
            c.range_u64(key, v as u64, 1, 1024)?;
        }
        let f = &self.fabric;
        if f.wavelet_bits != 32 {
            return Err(c.err("fabric.wavelet_bits", format!("{}: the engine models 32-bit wavelets", f.wavelet_bits)));
        }
        c.range_u64("fabric.link_wavelets_per_cycle", f.link_wavelets_per_cycle as u64, 1, 64)?;
        c.range_u64("fabric.hop_cycles", f.hop_cycles as u64, 1, 1_000)?;
        c.range_u64("fabric.ramp_cycles", f.ramp_cycles as u64, 0, 1_000)?;
        // Colors are a 5-bit tag in hardware; allow more for counterfactual routers, but not absurd numbers.
        c.range_u64("fabric.colors", f.colors as u64, 1, 256)?;
        c.range_u64("fabric.queue_depth", f.queue_depth as u64, 1, 1 << 16)?;
        c.range_u64("fabric.relay_cycles", f.relay_cycles as u64, 0, 100_000)?;
        if let Some(io) = &self.io {
            c.range_u64("io.ports", io.ports as u64, 1, 4096)?;
            c.range_f64("io.port_bits_per_s", io.port_bits_per_s, 1e6, 1e15)?;
            c.range_f64("io.system_bits_per_s", io.system_bits_per_s, 1e6, 1e17)?;
            c.range_f64("io.latency_ns", io.latency_ns, 0.0, 1e9)?;
            let perimeter = 2 * (self.full_mesh.width as u64 + self.full_mesh.height as u64);
            if io.ports as u64 > perimeter {
                return Err(c.err("io.ports", format!("{} ports do not fit the {perimeter} edge PEs", io.ports)));
            }
        }
        if let Some(m) = &self.memoryx {
            c.range_f64("memoryx.capacity_bytes", m.capacity_bytes, 1e6, 1e19)?;
            c.range_f64("memoryx.bytes_per_s", m.bytes_per_s, 1e6, 1e16)?;
            c.range_f64("memoryx.update_params_per_s", m.update_params_per_s, 1e6, 1e18)?;
        }
        if let Some(s) = &self.swarmx {
            c.range_u64("swarmx.fanout", s.fanout as u64, 2, 1024)?;
            c.range_f64("swarmx.link_bits_per_s", s.link_bits_per_s, 1e6, 1e16)?;
            c.range_f64("swarmx.hop_latency_ns", s.hop_latency_ns, 0.0, 1e9)?;
        }
        Ok(())
    }
}
