//! Fixtures for the trace tests: a small mesh running a GEMV with a tree reduction beside a region that
//! consumes a stream from an IO port, so traces have regions, idle PEs, stalls of every kind and a port.
#![allow(dead_code)]

use waferscale::engine::{self, synth, EngineOptions, EngineRun, Fidelity};
use waferscale::hw::{load_with_overrides, SimdOp, WaferHw};
use waferscale::mesh::*;
use waferscale::report::WorkloadSummary;
use waferscale::trace::{self, TraceHeader, TraceOptions};

pub struct Fixture {
    pub program: MeshProgram,
    pub run: EngineRun,
    pub header: TraceHeader,
}

pub fn workload() -> WorkloadSummary {
    WorkloadSummary {
        phase: "decode".into(),
        batch: 1,
        seq: 1,
        context: 0,
        dtype: "fp16".into(),
        sparsity: 0.0,
        recompute: false,
        tokens: 1,
    }
}

/// A `w x h` mesh: GEMV (k x n) with a 2-level tree on the west `w - 4` columns, and a 4-column region on
/// the east whose PE (w-4, 0) consumes `stream` wavelets from a MemoryX port at 1 wavelet per 3 cycles.
pub fn program(w: u32, h: u32, k: u64, n: u64, stream: u64) -> MeshProgram {
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap().with_mesh(w, h).unwrap();
    let mut p = synth::gemv_tree(&hw, k, n, w - 4, h, 4);
    let region = RegionId(p.regions.len() as u32);
    p.regions.push(Region {
        name: "io.consume".into(),
        rect: Rect { x: w - 4, y: 0, w: 4, h },
        ops: vec!["consume".into()],
        kind: "elementwise".into(),
        algorithm: "stream".into(),
        flops: 2 * stream,
    });
    let port_t = TemplateId(p.templates.len() as u32);
    p.templates.push(Template {
        name: "port-in".into(),
        region,
        tasks: vec![Task {
            name: "stream".into(),
            needs: vec![],
            work: Work { op: SimdOp::Mov32, elems: 0, paced_by: None },
            sends: vec![Send { color: ColorId(5), wavelets: stream, streamed: false, runs: None }],
            repeat: 1,
            flops: 0,
        }],
        sram_bytes: 0,
        fifos: vec![],
    });
    let consume_t = TemplateId(p.templates.len() as u32);
    p.templates.push(Template {
        name: "consume".into(),
        region,
        tasks: vec![Task {
            name: "scale".into(),
            needs: vec![Need::Recv { color: ColorId(5), wavelets: stream }],
            work: Work { op: SimdOp::ArithF16, elems: 2 * stream, paced_by: Some(ColorId(5)) },
            sends: vec![],
            repeat: 1,
            flops: 2 * stream,
        }],
        sram_bytes: 4 * stream,
        fifos: vec![],
    });
    p.tiles.push(Tile { rect: Rect { x: w - 4, y: 0, w: 1, h: 1 }, template: consume_t });
    p.ports.push(Port {
        name: "mx0".into(),
        side: Dir::East,
        at: Coord { x: w - 1, y: 0 },
        wavelets: 1,
        per_cycles: 3,
        latency_cycles: 20,
        peer: Peer::MemoryX,
        peer_port: None,
        template: port_t,
        planned_bytes: 4 * stream,
    });
    p.routes.push(Route {
        color: ColorId(5),
        senders: Senders::Port(PortId(0)),
        pattern: Pattern::Line { dir: Dir::West, hops: 3, multicast: false },
        relays: 0,
    });
    p.graph_flops += 2 * stream;
    p
}

pub fn run_traced(program: &MeshProgram, fidelity: Fidelity, threads: usize) -> EngineRun {
    let spec = trace::spec_for(program, &TraceOptions::default());
    engine::run(program, &EngineOptions { fidelity, threads, trace: Some(spec), progress: None }).unwrap()
}

pub fn make_fixture(program: MeshProgram, fidelity: Fidelity, threads: usize) -> Fixture {
    let run = run_traced(&program, fidelity, threads);
    let mut header = TraceHeader::for_run("gemv:4096x4096", workload(), "wse2", "pipelined", &program, &run);
    header.version = "waferscale (test)".into();
    Fixture { program, run, header }
}

/// 70 x 40 PEs: large enough to cut into several partitions.
pub fn fixture(fidelity: Fidelity, threads: usize) -> Fixture {
    make_fixture(program(70, 40, 2048, 2048, 3000), fidelity, threads)
}

/// 12 x 8 PEs, for byte-by-byte corruption tests.
pub fn small_fixture() -> Fixture {
    make_fixture(program(12, 8, 256, 256, 200), Fidelity::Detailed, 1)
}
