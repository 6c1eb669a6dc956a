//! GPUs (`kind = "gpu"`) and GPU clusters (`kind = "gpu-cluster"`): SMs and clocks, tensor-core
//! rates per dtype, register file and SMEM/L1, L2 (size, partitions, associativity, bandwidth), HBM,
//! NVLink, the NIC, launch overhead; and for clusters, nodes of GPUs on NVSwitch, the scale-out
//! network and the NCCL-like collective parameters.
//!
//! A cluster file `extends` a GPU file, so every GPU key can be overridden through the cluster
//! (`--hw dgx-h100 --set l2.bytes=62914560`).

use serde::Deserialize;

use super::load::{decode, kind, HwDoc};
use super::{Check, HwError};
use crate::model::DType;

/// Instruction-set generation: which kernels exist for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuArch {
    /// A100: `mma.sync` tensor cores fed from registers, `cp.async`; FlashAttention-2 kernels.
    Ampere,
    /// H100/H200: asynchronous `wgmma` from SMEM, TMA, persistent warp-specialized kernels, FlashAttention-3.
    Hopper,
}

impl GpuArch {
    pub fn name(self) -> &'static str {
        match self {
            GpuArch::Ampere => "ampere",
            GpuArch::Hopper => "hopper",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmSpec {
    pub count: u32,
    /// The clock every rate is counted at (the clock NVIDIA's tensor peak uses): the boost clock of
    /// a burst; under sustained load the power limit may hold a kernel below it ([`PowerSpec`]).
    pub clock_hz: f64,
    pub register_file_bytes: u64,
    /// The combined L1/SMEM pool per SM.
    pub l1_smem_bytes: u64,
    /// The most of that pool one SM can give to shared memory.
    pub smem_bytes: u64,
    /// Bytes per clock the SM's SMEM/L1 delivers.
    pub smem_bytes_per_clk: u64,
    /// Non-tensor FP32 FLOPs per clock (an FMA counts two).
    pub fp32_flops_per_clk: u64,
    /// FP32 results per clock of the special-function units (MUFU: exp2, log2, rsqrt, sin, cos),
    /// which compute the softmax's exponentials.
    pub mufu_ops_per_clk: u64,
}

/// A value per tensor-core input type.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerDtype {
    pub fp16: f64,
    pub bf16: f64,
    /// 0 where the GPU has no FP8 tensor cores.
    pub fp8: f64,
    /// FP32 matrix multiplication on the non-tensor pipes (PyTorch's default: TF32 off).
    pub fp32: f64,
}

impl PerDtype {
    pub fn get(&self, d: DType) -> f64 {
        match d {
            DType::Fp16 => self.fp16,
            DType::Bf16 => self.bf16,
            DType::Fp8 => self.fp8,
            DType::Fp32 => self.fp32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Dense FLOPs per clock per SM of the tensor cores, per input type (`fp32` = the FP32 pipes).
    pub flops_per_clk: PerDtype,
    /// Fraction of that rate a long GEMM main loop sustains on random data (power-limited clocks,
    /// instruction issue); one number per GPU and dtype, measured on a best-case shape.
    pub sustained_fraction: PerDtype,
    /// FP16/BF16 FLOPs per clock per SM through the older synchronous `mma.sync` path, which
    /// FlashAttention-2 uses on every architecture.
    pub mma_sync_flops_per_clk: f64,
}

/// The board's power limit, as it bounds the SM clock under sustained load.
///
/// Dynamic power is switching activity x clock x voltage squared; with the voltage rising in step
/// with the clock over the DVFS range, a kernel whose tensor cores are busy a fraction `u` of the
/// clocks draws `P_static + k u f^3`. At the boost clock `f_b` the board reaches its limit when `u`
/// reaches `limit_utilization` (`u*`); a busier kernel, once the GPU has been loaded for longer than
/// `boost_window_s`, runs at `f_b (u* / u)^(1/3)`, the clock where its power is back at the limit.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerSpec {
    /// Tensor utilization (tensor FLOPs per clock over the peak's) at which the board reaches its
    /// power limit at the boost clock.
    pub limit_utilization: f64,
    /// How long a rested GPU holds the boost clock under load before the power limit brings it down.
    pub boost_window_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2Spec {
    pub bytes: u64,
    /// Address-interleaved partitions, each holding `bytes / partitions` with its share of the bandwidth.
    pub partitions: u32,
    /// Ways per set.
    pub ways: u32,
    /// Sustained read bandwidth of the whole L2 for an L2-resident working set.
    pub bytes_per_s: f64,
    pub near_latency_cycles: u32,
    pub far_latency_cycles: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HbmSpec {
    pub bytes: u64,
    /// Datasheet bandwidth (reported beside the sustained ones; never used for timing).
    pub spec_bytes_per_s: f64,
    /// Sustained bandwidth of a read-only stream.
    pub read_bytes_per_s: f64,
    /// Sustained bandwidth of a write-only stream; mixed streams pay each direction at its own rate.
    pub write_bytes_per_s: f64,
    pub latency_cycles: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvlinkSpec {
    pub links: u32,
    /// Per direction, all links together (datasheet).
    pub bytes_per_s: f64,
    /// Measured point-to-point bandwidth, one direction.
    pub p2p_bytes_per_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Line rate of the NIC paired with each GPU.
    pub bits_per_s: f64,
    /// What NCCL achieves per NIC.
    pub effective_bytes_per_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// GPU-side cost between two kernels of a captured CUDA graph.
    pub graph_ns: f64,
    /// Host-side cost of one eager launch (launch and synchronisation path): a kernel cannot start
    /// before the host has issued it.
    pub eager_ns: f64,
}

/// A node of GPUs on NVSwitch.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub gpus: u32,
    /// NVSwitch in-network reduction (NVLS / SHARP) is available.
    pub nvls: bool,
}

/// Collective-communication parameters (NCCL-like), for one node's NVSwitch and for the scale-out network.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NcclSpec {
    /// Bus bandwidth of a large ring all-reduce inside one node.
    pub ring_busbw_bytes_per_s: f64,
    /// Bus bandwidth of a large NVLS all-reduce inside one node (ignored without `node.nvls`).
    pub nvls_busbw_bytes_per_s: f64,
    /// Fixed latency of an 8-GPU collective in the low-latency protocol regime.
    pub ll_latency_s: f64,
    /// Fraction of the bus bandwidth the low-latency protocol reaches.
    pub ll_bandwidth_fraction: f64,
    /// Fixed latency of an 8-GPU collective in the bulk (Simple) protocol regime.
    pub simple_latency_s: f64,
    /// Latency added per step that crosses the scale-out network.
    pub net_hop_latency_s: f64,
}

/// The scale-out network between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub nodes: u32,
    /// Bisection bandwidth over injection bandwidth (1 = full-bisection fat tree).
    pub bisection_fraction: f64,
}

/// One GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuHw {
    pub description: String,
    pub arch: GpuArch,
    pub sm: SmSpec,
    pub tensor: TensorSpec,
    pub l2: L2Spec,
    pub hbm: HbmSpec,
    pub nvlink: NvlinkSpec,
    pub nic: NicSpec,
    pub launch: LaunchSpec,
    pub power: PowerSpec,
}

impl GpuHw {
    /// Dense peak FLOP/s of one GPU for matrix work in `dtype` (0 when unsupported).
    pub fn peak_flops_per_s(&self, dtype: DType) -> f64 {
        self.tensor.flops_per_clk.get(dtype) * self.sm.count as f64 * self.sm.clock_hz
    }

    /// Peak FP32 vector FLOP/s (non-tensor).
    pub fn fp32_flops_per_s(&self) -> f64 {
        self.sm.fp32_flops_per_clk as f64 * self.sm.count as f64 * self.sm.clock_hz
    }

    pub fn cycles_to_s(&self, cycles: f64) -> f64 {
        cycles / self.sm.clock_hz
    }

    /// The same GPU with its SMs at `hz`: every per-clock rate (tensor, SMEM, FP32, MUFU) and every
    /// latency counted in cycles follows; L2, HBM, NVLink and launch costs, given in seconds, do not.
    pub fn at_clock(&self, hz: f64) -> GpuHw {
        let mut g = self.clone();
        g.sm.clock_hz = hz;
        g
    }

    /// The SM clock the power limit allows under sustained load for a kernel whose tensor cores are
    /// busy a fraction `utilization` of the clocks (at most the boost clock; see [`PowerSpec`]).
    pub fn power_limited_clock_hz(&self, utilization: f64) -> f64 {
        let u_star = self.power.limit_utilization;
        if utilization <= u_star {
            self.sm.clock_hz
        } else {
            self.sm.clock_hz * (u_star / utilization).cbrt()
        }
    }
}

/// What `--hw` names for `wafer gpu`: one GPU, or a cluster of them.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSystem {
    /// The description's name (`h100`, `dgx-h100`).
    pub name: String,
    pub path: String,
    /// `gpu` or `gpu-cluster`.
    pub kind: String,
    /// Human name of the system (`DGX H100`), or of the GPU for a single GPU.
    pub description: String,
    pub gpu: GpuHw,
    pub node: NodeSpec,
    pub network: NetworkSpec,
    /// Absent for a single GPU.
    pub nccl: Option<NcclSpec>,
}

impl GpuSystem {
    pub fn max_gpus(&self) -> u64 {
        self.node.gpus as u64 * self.network.nodes as u64
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuFile {
    #[allow(dead_code)]
    kind: String,
    name: String,
    arch: GpuArch,
    sm: SmSpec,
    tensor: TensorSpec,
    l2: L2Spec,
    hbm: HbmSpec,
    nvlink: NvlinkSpec,
    nic: NicSpec,
    launch: LaunchSpec,
    power: PowerSpec,
    /// Set by cluster files (which extend a GPU file): the system's name (`DGX H100`).
    cluster_name: Option<String>,
    node: Option<NodeSpec>,
    network: Option<NetworkSpec>,
    nccl: Option<NcclSpec>,
}

impl GpuSystem {
    /// Decodes and validates a GPU or GPU-cluster description (after `extends` and `--set`).
    pub fn from_doc(doc: &HwDoc) -> Result<GpuSystem, HwError> {
        let k = kind(doc)?;
        if k != "gpu" && k != "gpu-cluster" {
            return Err(HwError::WrongKind {
                path: doc.path.clone(),
                name: doc.name.clone(),
                found: k,
                wanted: "gpu or gpu-cluster (a100, h100, h200, dgx-h100, h100-superpod-256, ...)".into(),
            });
        }
        let f: GpuFile = decode(doc, &doc.tree)?;
        let c = Check { path: &doc.path };
        let cluster = k == "gpu-cluster";
        if cluster != f.cluster_name.is_some() {
            return Err(c.err(
                "cluster_name",
                "a gpu-cluster description names its system here; a gpu description does not".into(),
            ));
        }
        let (node, network, nccl) = if cluster {
            let missing = |key: &str| c.err(key, "a gpu-cluster description needs this table".into());
            (
                f.node.ok_or_else(|| missing("node"))?,
                f.network.ok_or_else(|| missing("network"))?,
                Some(f.nccl.ok_or_else(|| missing("nccl"))?),
            )
        } else {
            if let Some(key) =
                [("node", f.node.is_some()), ("network", f.network.is_some()), ("nccl", f.nccl.is_some())]
                    .iter()
                    .find(|(_, present)| *present)
                    .map(|(k, _)| *k)
            {
                return Err(c.err(key, "only a gpu-cluster description has this table".into()));
            }
            (NodeSpec { gpus: 1, nvls: false }, NetworkSpec { nodes: 1, bisection_fraction: 1.0 }, None)
        };
        let description = f.cluster_name.clone().unwrap_or_else(|| f.name.clone());
        let sys = GpuSystem {
            name: doc.name.clone(),
            path: doc.path.clone(),
            kind: k,
            description,
            gpu: GpuHw {
                description: f.name,
                arch: f.arch,
                sm: f.sm,
                tensor: f.tensor,
                l2: f.l2,
                hbm: f.hbm,
                nvlink: f.nvlink,
                nic: f.nic,
                launch: f.launch,
                power: f.power,
            },
            node,
            network,
            nccl,
        };
        sys.validate(&c)?;
        Ok(sys)
    }

    /// Sanity limits: generous for counterfactual sweeps, tight enough to catch typos and units.
    fn validate(&self, c: &Check) -> Result<(), HwError> {
        let g = &self.gpu;
        c.range_u64("sm.count", g.sm.count as u64, 1, 4096)?;
        c.range_f64("sm.clock_hz", g.sm.clock_hz, 1e8, 1e10)?;
        c.range_u64("sm.register_file_bytes", g.sm.register_file_bytes, 1024, 1 << 24)?;
        c.range_u64("sm.l1_smem_bytes", g.sm.l1_smem_bytes, 1024, 1 << 24)?;
        c.range_u64("sm.smem_bytes", g.sm.smem_bytes, 1024, g.sm.l1_smem_bytes)?;
        c.range_u64("sm.smem_bytes_per_clk", g.sm.smem_bytes_per_clk, 1, 1 << 16)?;
        c.range_u64("sm.fp32_flops_per_clk", g.sm.fp32_flops_per_clk, 1, 1 << 20)?;
        c.range_u64("sm.mufu_ops_per_clk", g.sm.mufu_ops_per_clk, 1, 1 << 16)?;
        let t = &g.tensor;
        for (key, v, min) in [
            ("tensor.flops_per_clk.fp16", t.flops_per_clk.fp16, 1.0),
            ("tensor.flops_per_clk.bf16", t.flops_per_clk.bf16, 1.0),
            ("tensor.flops_per_clk.fp8", t.flops_per_clk.fp8, 0.0),
            ("tensor.flops_per_clk.fp32", t.flops_per_clk.fp32, 1.0),
            ("tensor.mma_sync_flops_per_clk", t.mma_sync_flops_per_clk, 1.0),
        ] {
            c.range_f64(key, v, min, 1e7)?;
        }
        for (key, v) in [
            ("tensor.sustained_fraction.fp16", t.sustained_fraction.fp16),
            ("tensor.sustained_fraction.bf16", t.sustained_fraction.bf16),
            ("tensor.sustained_fraction.fp8", t.sustained_fraction.fp8),
            ("tensor.sustained_fraction.fp32", t.sustained_fraction.fp32),
        ] {
            c.range_f64(key, v, 0.01, 1.0)?;
        }
        let l2 = &g.l2;
        c.range_u64("l2.partitions", l2.partitions as u64, 1, 64)?;
        c.range_u64("l2.ways", l2.ways as u64, 1, 256)?;
        c.range_u64("l2.bytes", l2.bytes, (l2.partitions as u64 * l2.ways as u64) << 10, 1 << 40)?;
        c.range_f64("l2.bytes_per_s", l2.bytes_per_s, 1e9, 1e16)?;
        c.range_u64("l2.near_latency_cycles", l2.near_latency_cycles as u64, 1, 100_000)?;
        c.range_u64("l2.far_latency_cycles", l2.far_latency_cycles as u64, l2.near_latency_cycles as u64, 100_000)?;
        let h = &g.hbm;
        c.range_u64("hbm.bytes", h.bytes, 1 << 20, 1 << 50)?;
        c.range_f64("hbm.spec_bytes_per_s", h.spec_bytes_per_s, 1e9, 1e15)?;
        c.range_f64("hbm.read_bytes_per_s", h.read_bytes_per_s, 1e9, 1e15)?;
        c.range_f64("hbm.write_bytes_per_s", h.write_bytes_per_s, 1e9, 1e15)?;
        c.range_u64("hbm.latency_cycles", h.latency_cycles as u64, 1, 1_000_000)?;
        c.range_u64("nvlink.links", g.nvlink.links as u64, 0, 1024)?;
        c.range_f64("nvlink.bytes_per_s", g.nvlink.bytes_per_s, 1e6, 1e15)?;
        c.range_f64("nvlink.p2p_bytes_per_s", g.nvlink.p2p_bytes_per_s, 1e6, 1e15)?;
        c.range_f64("nic.bits_per_s", g.nic.bits_per_s, 1e6, 1e15)?;
        c.range_f64("nic.effective_bytes_per_s", g.nic.effective_bytes_per_s, 1e5, g.nic.bits_per_s / 8.0)?;
        c.range_f64("launch.graph_ns", g.launch.graph_ns, 0.0, 1e9)?;
        c.range_f64("launch.eager_ns", g.launch.eager_ns, 0.0, 1e9)?;
        c.range_f64("power.limit_utilization", g.power.limit_utilization, 0.01, 1.0)?;
        c.range_f64("power.boost_window_s", g.power.boost_window_s, 0.0, 3600.0)?;
        c.range_u64("node.gpus", self.node.gpus as u64, 1, 1024)?;
        c.range_u64("network.nodes", self.network.nodes as u64, 1, 1 << 20)?;
        c.range_f64("network.bisection_fraction", self.network.bisection_fraction, 0.01, 1.0)?;
        if let Some(n) = &self.nccl {
            c.range_f64("nccl.ring_busbw_bytes_per_s", n.ring_busbw_bytes_per_s, 1e6, 1e15)?;
            c.range_f64("nccl.nvls_busbw_bytes_per_s", n.nvls_busbw_bytes_per_s, 1e6, 1e15)?;
            c.range_f64("nccl.ll_latency_s", n.ll_latency_s, 0.0, 1.0)?;
            c.range_f64("nccl.ll_bandwidth_fraction", n.ll_bandwidth_fraction, 0.01, 1.0)?;
            c.range_f64("nccl.simple_latency_s", n.simple_latency_s, 0.0, 1.0)?;
            c.range_f64("nccl.net_hop_latency_s", n.net_hop_latency_s, 0.0, 1.0)?;
        }
        Ok(())
    }
}
