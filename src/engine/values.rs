//! Values through the engine (functional runs): every PE's SRAM holds real values, every task computes
//! real values when the engine starts it, and every train carries its sender's values.
//!
//! What a task computes is the program's data side table (`mesh::data`): a kernel that reads the
//! payloads of the trains the task claimed (in need order) and its PE's SRAM, and says what each of
//! its sends carries. Payloads are fragments tagged with the slice of the graph tensor they hold (the
//! addresses a real program knows statically), so a wrong route or a missing reduction shows up as an
//! error naming the PE, the task and the slice, or as a wrong number, never as a silent success.
//!
//! Architecture invariant: this module observes the engine and never steers it: no timing, ordering
//! or wavelet count depends on a value, so a run's timing is identical with and without values.
//! Partial sums that meet at a PE are added in the order of their senders' ids (never arrival order),
//! so values do not depend on timing or on the thread count.
//!
//! Rounding model: arithmetic in fp32 (sums over k in increasing order within a PE, partial sums added
//! in sender order); values stored in SRAM and sent in wavelets are rounded to the storage dtype
//! (fp16/bf16: nearest even) when the program's dtype is narrower than fp32.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::mesh::data::{Kernel, ProgramData, Share, TaskData};
use crate::mesh::{Coord, Need, Task};

/// A slice of a graph tensor viewed as `rows x cols`: rows r0..r1, columns c0..c1, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Frag {
    pub tensor: u32,
    pub r0: u32,
    pub r1: u32,
    pub c0: u32,
    pub c1: u32,
    /// Terms summed into every value (a partial sum over part of a contraction).
    pub cover: u64,
    /// Global id of the agent that made it (partial sums are added in this order).
    pub src: u32,
    pub vals: Arc<[f32]>,
}

impl Frag {
    fn slice(&self) -> String {
        format!("t{}[{}..{}, {}..{}]", self.tensor, self.r0, self.r1, self.c0, self.c1)
    }
    fn same_slice(&self, o: &Frag) -> bool {
        (self.tensor, self.r0, self.r1, self.c0, self.c1) == (o.tensor, o.r0, o.r1, o.c0, o.c1)
    }
}

/// What one train carries.
pub type Payload = Arc<[Frag]>;

/// Storage rounding of values kept in SRAM and sent in wavelets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Fp32,
    Fp16,
    Bf16,
}

impl Storage {
    pub fn round(self, x: f32) -> f32 {
        match self {
            Storage::Fp32 => x,
            Storage::Fp16 => half::f16::from_f32(x).to_f32(),
            Storage::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            Storage::Fp32 => 4,
            Storage::Fp16 | Storage::Bf16 => 2,
        }
    }
}

/// Everything a functional run starts from.
#[derive(Debug)]
pub struct Setup {
    pub data: Arc<ProgramData>,
    /// Values the wafer holds before the run (weights, pre-placed operands, KV caches) and the host's
    /// inputs, by graph tensor id, row-major.
    pub tensors: BTreeMap<u32, Arc<[f32]>>,
    pub storage: Storage,
}

/// One PE's values.
#[derive(Debug, Default)]
struct Pe {
    acc: Option<Frag>,
    /// What each send of the running task carries.
    out: Vec<Option<Payload>>,
    /// Bytes of values resident in SRAM (tiles and buffers).
    sram: u64,
}

/// The values of one partition's agents (local indices as in `sim::Part`).
#[derive(Debug)]
pub struct PartValues {
    setup: Arc<Setup>,
    pes: Vec<Pe>,
}

/// Where a task is: for error messages and kernels.
pub struct At<'a> {
    pub id: u32,
    pub coord: Coord,
    pub template: usize,
    pub k: usize,
    pub task: &'a Task,
    /// SRAM the plan allocated on this PE and the PE's capacity.
    pub sram_planned: u64,
    pub sram_bytes: u64,
}

impl At<'_> {
    fn name(&self) -> String {
        format!("PE ({},{}) task `{}`", self.coord.x, self.coord.y, self.task.name)
    }
}

impl PartValues {
    pub fn new(setup: Arc<Setup>, agents: usize) -> PartValues {
        PartValues { setup, pes: (0..agents).map(|_| Pe::default()).collect() }
    }

    /// Runs task `at.k`'s kernel on the payloads it claimed (one list per `Recv` need, in need order).
    pub fn start(&mut self, local: usize, at: &At, claimed: Vec<Vec<Payload>>) -> Result<(), String> {
        let data = Arc::clone(&self.setup.data);
        let td = data.tasks.get(at.template).and_then(|t| t.get(at.k)).unwrap_or(&TaskData::None);
        let n_sends = at.task.sends.len();
        let out: Payload = match td {
            TaskData::None => {
                self.pes[local].out = vec![None; n_sends];
                return Ok(());
            }
            TaskData::Kernel(kernel) => self.kernel(local, at, kernel, claimed)?,
        };
        self.pes[local].out = vec![Some(out); n_sends];
        Ok(())
    }

    /// What send `i` of the task that agent `local` runs carries.
    pub fn payload(&self, local: usize, i: usize) -> Option<Payload> {
        self.pes[local].out.get(i).cloned().flatten()
    }

    /// The accumulators of the given agents (local index, coordinate) that lie in a readout rectangle.
    pub fn results(&self, agents: impl Iterator<Item = (usize, Coord)>) -> Vec<(Coord, Frag)> {
        let rects: Vec<_> = self.setup.data.readouts.iter().map(|r| r.rect).collect();
        agents
            .filter(|(_, c)| rects.iter().any(|r| r.contains(*c)))
            .filter_map(|(l, c)| self.pes.get(l).and_then(|p| p.acc.clone()).map(|f| (c, f)))
            .collect()
    }

    fn tensor(&self, t: u32, at: &At) -> Result<Arc<[f32]>, String> {
        self.setup.tensors.get(&t).cloned().ok_or_else(|| format!("{}: no values for tensor t{t}", at.name()))
    }

    /// Accounts `bytes` more of resident values on a PE, checked against the plan and the SRAM.
    fn alloc(&mut self, local: usize, at: &At, bytes: u64) -> Result<(), String> {
        let pe = &mut self.pes[local];
        pe.sram += bytes;
        if pe.sram > at.sram_bytes || pe.sram > at.sram_planned {
            return Err(format!(
                "{}: holds {} bytes of values, but the plan allocated {} bytes on this PE (SRAM {} bytes)",
                at.name(),
                pe.sram,
                at.sram_planned,
                at.sram_bytes
            ));
        }
        Ok(())
    }

    fn send_acc(&self, local: usize) -> Payload {
        let st = self.setup.storage;
        match &self.pes[local].acc {
            Some(a) => {
                let vals: Arc<[f32]> = a.vals.iter().map(|&v| st.round(v)).collect();
                Arc::from(vec![Frag { vals, ..a.clone() }])
            }
            None => Arc::from(Vec::new()),
        }
    }

    fn kernel(
        &mut self,
        local: usize,
        at: &At,
        kernel: &Kernel,
        claimed: Vec<Vec<Payload>>,
    ) -> Result<Payload, String> {
        let st = self.setup.storage;
        match *kernel {
            Kernel::GemvPartial { grid, x, w, w_out_in, k, n, out } => {
                let Some((r, c)) = grid.pos(at.coord) else {
                    return Err(format!("{}: outside the GEMV's grid", at.name()));
                };
                let (k0, kl) = Share { n: k, parts: grid.rows as u64 }.range(r);
                let (n0, nl) = Share { n, parts: grid.cols as u64 }.range(c);
                let (xv, wv) = (self.tensor(x, at)?, self.tensor(w, at)?);
                if xv.len() as u64 != k || wv.len() as u64 != k * n {
                    return Err(format!(
                        "{}: operands of {} and {} values for a {k}x{n} GEMV",
                        at.name(),
                        xv.len(),
                        wv.len()
                    ));
                }
                if self.pes[local].acc.is_none() {
                    // The pre-placed tiles: x's k-slice, W's block, and the accumulator.
                    self.alloc(local, at, (kl + kl * nl + nl) * st.bytes())?;
                }
                let mut acc = vec![0f32; nl as usize];
                for (j, a) in acc.iter_mut().enumerate() {
                    let col = n0 + j as u64;
                    for kk in k0..k0 + kl {
                        let wi = if w_out_in { col * k + kk } else { kk * n + col };
                        *a += st.round(xv[kk as usize]) * st.round(wv[wi as usize]);
                    }
                }
                self.pes[local].acc = Some(Frag {
                    tensor: out,
                    r0: 0,
                    r1: 1,
                    c0: n0 as u32,
                    c1: (n0 + nl) as u32,
                    cover: kl,
                    src: at.id,
                    vals: acc.into(),
                });
                Ok(self.send_acc(local))
            }
            Kernel::Accumulate => {
                let mut parts: Vec<Frag> = claimed.into_iter().flatten().flat_map(|p| p.to_vec()).collect();
                parts.sort_by_key(|f| f.src);
                let Some(acc) = self.pes[local].acc.as_mut() else {
                    return Err(format!("{}: adds partial sums but holds no accumulator", at.name()));
                };
                let want: u64 = at.task.needs.iter().filter(|n| matches!(n, Need::Recv { .. })).count() as u64;
                if want > 0 && parts.is_empty() {
                    return Err(format!("{}: claimed trains that carried no partial sums", at.name()));
                }
                let mut vals = acc.vals.to_vec();
                for p in &parts {
                    if !p.same_slice(acc) || p.vals.len() != vals.len() {
                        return Err(format!(
                            "{}: received a partial sum of {} but accumulates {}",
                            at.name(),
                            p.slice(),
                            acc.slice()
                        ));
                    }
                    for (a, b) in vals.iter_mut().zip(p.vals.iter()) {
                        *a += *b;
                    }
                    acc.cover += p.cover;
                }
                acc.vals = vals.into();
                Ok(self.send_acc(local))
            }
        }
    }
}
