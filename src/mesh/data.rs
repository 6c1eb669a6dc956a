//! The data side table of a mesh program: what each task does to *values*, for functional runs.
//!
//! The timing program (`MeshProgram`) says when tasks run and how many wavelets move; this table says
//! which slice of which graph tensor a PE holds, what a task computes from the trains it claimed and
//! its PE's SRAM, and what its sends carry. It is cold data: the engine reads it only in functional
//! runs, and it never changes the timing program or its printer.
//!
//! Slices are formulas of the PE's position (a `Grid` and the same `split` rule the tiling uses),
//! never per-PE lists, so the table stays as compact as the program.
//!
//! Architecture invariant: tensors are named by their graph `TensorId` as a plain `u32` (the engine
//! never sees the graph); everything a kernel needs (sizes, layouts) is written here by the compiler.

use super::{Coord, Rect};

/// `n` split over `parts`: part i gets `q + 1` for `i < r`, else `q` (the tiling's `split`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub n: u64,
    pub parts: u64,
}

impl Share {
    /// (offset, length) of part `i`.
    pub fn range(&self, i: u64) -> (u64, u64) {
        let parts = self.parts.max(1);
        let (q, r) = (self.n / parts, self.n % parts);
        (i * q + i.min(r), q + (i < r) as u64)
    }
}

/// PEs numbered by their row and column within a rectangle whose top-left PE is `origin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub origin: Coord,
    pub rows: u32,
    pub cols: u32,
}

impl Grid {
    /// (row, column) of the PE at `at`, if it is in the grid.
    pub fn pos(&self, at: Coord) -> Option<(u64, u64)> {
        let inside = at.x >= self.origin.x
            && at.y >= self.origin.y
            && at.x < self.origin.x + self.cols
            && at.y < self.origin.y + self.rows;
        inside.then(|| ((at.y - self.origin.y) as u64, (at.x - self.origin.x) as u64))
    }
}

/// The values kernel of a task. Every kernel runs when the engine starts the task, on the payloads of
/// the trains the task claimed (in need order) and its PE's SRAM; each of the task's sends carries
/// what the kernel says.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// A partial matrix-vector product: the PE at grid position (r, c) holds the k-slice
    /// `Share { n: k, parts: grid.rows }` r of the vector `x` and the block (k-slice r, n-slice c) of
    /// the `k x n` matrix `w` (`w_out_in`: stored `[n, k]`, as `nn.Linear`) in its SRAM, and computes
    /// the partial sums of its n-slice into its accumulator (summing over k in increasing order). Its
    /// sends carry the accumulator.
    GemvPartial { grid: Grid, x: u32, w: u32, w_out_in: bool, k: u64, n: u64, out: u32 },
    /// Adds the partial sums claimed (one train per need, in need order) to the accumulator, which
    /// must hold the same slice of the same tensor; the sends carry the accumulator.
    Accumulate,
}

/// What a task does to values.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskData {
    /// Moves no values (a task whose wavelets nobody reads).
    None,
    Kernel(Kernel),
}

/// Where a result is when the run ends: the accumulators of the PEs in `rect` hold, together, the
/// whole `rows x cols` tensor `tensor`, each value summed over all `cover` terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Readout {
    pub tensor: u32,
    pub name: String,
    pub rect: Rect,
    pub rows: u64,
    pub cols: u64,
    pub cover: u64,
}

/// The data side table of one program.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgramData {
    /// Per template (indexed like `MeshProgram::templates`), per task.
    pub tasks: Vec<Vec<TaskData>>,
    pub readouts: Vec<Readout>,
    /// Why values cannot run through this program yet (regions whose algorithm has no data semantics);
    /// a functional run refuses the program when this is not empty.
    pub unsupported: Vec<String>,
}
