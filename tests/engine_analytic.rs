//! The analytic suite: hand-written mesh programs whose timing has a closed form. Each test states the
//! formula and the tolerance; the engine must reproduce it from its mechanisms (links, ramps, picks,
//! SIMD widths, port rates), not from the formula.

use waferscale::engine::{self, EngineError, EngineOptions, EngineRun, Fidelity};
use waferscale::hw::{load_with_overrides, SimdOp, WaferHw};
use waferscale::mesh::Cluster;
use waferscale::mesh::*;

fn wse2() -> WaferHw {
    WaferHw::from_doc(&load_with_overrides("wse2", &[]).unwrap()).unwrap()
}

struct B {
    p: MeshProgram,
}

impl B {
    fn new(w: u32, h: u32) -> B {
        let hw = wse2();
        B {
            p: MeshProgram {
                version: PROGRAM_VERSION,
                mesh: MeshDims { width: w, height: h },
                timing: Timing::from_hw(&hw),
                regions: vec![Region {
                    name: "test".into(),
                    rect: Rect { x: 0, y: 0, w, h },
                    ops: vec![],
                    kind: "test".into(),
                    algorithm: "hand-written".into(),
                    flops: 0,
                }],
                templates: vec![],
                tiles: vec![],
                routes: vec![],
                ports: vec![],
                graph_flops: 0,
                wafer_width: None,
                data: None,
            },
        }
    }
    fn template(&mut self, name: &str, tasks: Vec<Task>) -> TemplateId {
        self.p.templates.push(Template { name: name.into(), region: RegionId(0), tasks, sram_bytes: 0, fifos: vec![] });
        TemplateId(self.p.templates.len() as u32 - 1)
    }
    fn tile(&mut self, x: u32, y: u32, w: u32, h: u32, t: TemplateId) {
        self.p.tiles.push(Tile { rect: Rect { x, y, w, h }, template: t });
    }
    fn route(&mut self, color: u32, senders: Rect, pattern: Pattern) {
        self.p.routes.push(Route { color: ColorId(color), senders: Senders::Pes(senders), pattern, relays: 0 });
    }
    fn run(&self) -> Result<EngineRun, EngineError> {
        engine::run(&self.p, &EngineOptions { fidelity: Fidelity::Detailed, threads: 1, trace: None, progress: None })
    }
}

fn rect(x: u32, y: u32, w: u32, h: u32) -> Rect {
    Rect { x, y, w, h }
}

fn task(name: &str, needs: Vec<Need>, op: SimdOp, elems: u64, paced: Option<u32>, sends: Vec<Send>) -> Task {
    Task {
        name: name.into(),
        needs,
        work: Work { op, elems, paced_by: paced.map(ColorId) },
        sends,
        repeat: 1,
        flops: 0,
    }
}

fn recv(c: u32, n: u64) -> Need {
    Need::Recv { color: ColorId(c), wavelets: n }
}

fn send(c: u32, n: u64) -> Send {
    Send { color: ColorId(c), wavelets: n, streamed: false, runs: None }
}

/// Constants of the WSE-2 description the formulas use.
const PICK: u64 = 2;
const RAMP: u64 = 1;
const HOP: u64 = 1;

/// Sender `s` at (0, 0), receiver `r` at (h, 0), idle PEs between, color 0 going east from the sender.
fn east_line(b: &mut B, h: u32, s: TemplateId, r: TemplateId) {
    b.tile(0, 0, 1, 1, s);
    b.tile(h, 0, 1, 1, r);
    if h > 1 {
        let idle = b.template("idle", vec![]);
        b.tile(1, 0, h - 1, 1, idle);
    }
    b.route(0, rect(0, 0, 1, 1), Pattern::Line { dir: Dir::East, hops: h, multicast: false });
}

/// A sender and a receiver `h` hops east; `n` wavelets. Uncontended train over h hops:
/// head = pick + ramp + h*hop + ramp, tail = head + n - 1, done = tail + pick.
fn train(h: u32, n: u64) -> u64 {
    let mut b = B::new(h + 1, 1);
    let s = b.template("send", vec![task("send", vec![], SimdOp::Mov32, 0, None, vec![send(0, n)])]);
    let r = b.template("recv", vec![task("recv", vec![recv(0, n)], SimdOp::Mov32, 0, None, vec![])]);
    east_line(&mut b, h, s, r);
    b.run().unwrap().cycles
}

#[test]
fn one_hop() {
    // One wavelet over one hop: 1 cycle on the link plus a ramp each way, plus the two task picks.
    let expect = PICK + RAMP + HOP + RAMP + PICK;
    assert_eq!(train(1, 1), expect, "formula: pick + ramp + hop + ramp + pick");
}

#[test]
fn uncontended_train_over_h_hops() {
    for (h, n) in [(1u32, 100u64), (5, 1), (10, 1000), (37, 4096)] {
        let expect = PICK + RAMP + h as u64 * HOP + RAMP + (n - 1) + PICK;
        let got = train(h, n);
        println!("h={h} n={n}: engine {got}, formula {expect}");
        assert_eq!(got, expect, "formula: pick + ramp + h*hop + ramp + (n-1) + pick");
    }
}

#[test]
fn saturated_link_carries_one_wavelet_per_cycle() {
    // 100k wavelets over one link: within 0.01% of n cycles.
    let n = 100_000u64;
    let got = train(1, n);
    let rate = n as f64 / got as f64;
    println!("saturated link: {n} wavelets in {got} cycles = {rate:.5} wavelets/cycle");
    assert!((rate - 1.0).abs() < 1e-4);
}

#[test]
fn two_flows_sharing_a_link_take_twice_as_long() {
    // Flow A: (0,0) -> (2,0) over links (0,0)E and (1,0)E. Flow B: (1,0) -> (2,1) over (1,0)E and (2,0)S.
    // They share (1,0)E only: the second to reach it waits for the first's n wavelets.
    // Formula: the last tail arrives after about 2n cycles (tolerance 1%); one flow alone takes n.
    let n = 10_000u64;
    let mut b = B::new(3, 2);
    let a = b.template("a", vec![task("a", vec![], SimdOp::Mov32, 0, None, vec![send(0, n)])]);
    let bb = b.template("b", vec![task("b", vec![], SimdOp::Mov32, 0, None, vec![send(1, n)])]);
    let ra = b.template("ra", vec![task("ra", vec![recv(0, n)], SimdOp::Mov32, 0, None, vec![])]);
    let rb = b.template("rb", vec![task("rb", vec![recv(1, n)], SimdOp::Mov32, 0, None, vec![])]);
    let idle = b.template("idle", vec![]);
    b.tile(0, 0, 1, 1, a);
    b.tile(1, 0, 1, 1, bb);
    b.tile(2, 0, 1, 1, ra);
    b.tile(2, 1, 1, 1, rb);
    b.tile(0, 1, 2, 1, idle);
    b.route(0, rect(0, 0, 1, 1), Pattern::To { dx: 2, dy: 0 });
    b.route(1, rect(1, 0, 1, 1), Pattern::To { dx: 1, dy: 1 });
    let both = b.run().unwrap().cycles;
    let alone = train(2, n);
    let ratio = both as f64 / alone as f64;
    println!("shared link: {both} cycles, one flow {alone}: ratio {ratio:.4}");
    assert!((ratio - 2.0).abs() < 0.01);
}

#[test]
fn fmac_loop_at_simd_width() {
    // One PE, an fp16 FMAC over L elements: ceil(L / 4) cycles on WSE-2 (4-wide @fmach) + the pick.
    for l in [1u64, 4, 1000, 12_345] {
        let mut b = B::new(1, 1);
        let t = b.template("fmac", vec![task("fmac", vec![], SimdOp::FmacF16, l, None, vec![])]);
        b.tile(0, 0, 1, 1, t);
        let got = b.run().unwrap().cycles;
        assert_eq!(got, PICK + l.div_ceil(4), "L={l}: formula pick + ceil(L/4)");
    }
    // fp32 adds run 2-wide.
    let mut b = B::new(1, 1);
    let t = b.template("add", vec![task("add", vec![], SimdOp::ArithF32, 1000, None, vec![])]);
    b.tile(0, 0, 1, 1, t);
    assert_eq!(b.run().unwrap().cycles, PICK + 500);
}

#[test]
fn io_bound_stream_runs_at_the_port_rate() {
    // A port delivering B bytes at r wavelets per cycle (< 1, so the port, not the link, limits):
    // time = latency + (B/4) / r cycles (tolerance 0.1%).
    let bytes = 400_000u64;
    let n = bytes / 4;
    let (wavelets, per) = (3u64, 10u64); // 0.3 wavelets per cycle
    let latency = 500u64;
    let mut b = B::new(4, 1);
    let port_t = b.template("port", vec![task("stream", vec![], SimdOp::Mov32, 0, None, vec![send(0, n)])]);
    let r = b.template("recv", vec![task("recv", vec![recv(0, n)], SimdOp::Mov32, 0, None, vec![])]);
    let idle = b.template("idle", vec![]);
    b.tile(0, 0, 3, 1, idle);
    b.tile(3, 0, 1, 1, r);
    b.p.ports.push(Port {
        name: "w0".into(),
        side: Dir::West,
        at: Coord { x: 0, y: 0 },
        wavelets,
        per_cycles: per,
        latency_cycles: latency,
        peer: Peer::MemoryX,
        peer_port: None,
        template: port_t,
        planned_bytes: bytes,
    });
    b.p.routes.push(Route {
        color: ColorId(0),
        senders: Senders::Port(PortId(0)),
        pattern: Pattern::Line { dir: Dir::East, hops: 3, multicast: false },
        relays: 0,
    });
    let run = b.run().unwrap();
    let expect = latency as f64 + n as f64 * per as f64 / wavelets as f64;
    let rel = (run.cycles as f64 - expect).abs() / expect;
    println!("io stream: engine {} cycles, formula {expect:.0}, rel {rel:.5}", run.cycles);
    assert!(rel < 1e-3);
    assert_eq!(run.totals.io_bytes, vec![bytes]);
    let io = run.critical_path.0[waferscale::engine::Res::PerimeterIo as usize] as f64 / run.cycles as f64;
    assert!(io > 0.99, "the port binds: {:?}", run.critical_path);
}

/// A sum all-reduce over a PxP region: rows reduce toward the centre column (two chains meeting at
/// it), the centre column reduces toward the centre PE, and the centre multicasts the result back to
/// the whole region. Each reduction stage costs a ramp down, a pick, one add and a ramp up plus the
/// hop; the broadcast costs the diameter in hops. Closed form (P odd, c = (P-1)/2), tolerance 2%:
///   (pick + add) + 2c x (hop + 2 ramp + pick + add) + 2 merges + ramp + 2c x hop + ramp + pick.
#[test]
fn tree_allreduce_matches_its_closed_form() {
    for p in [5u32, 9, 33] {
        let c = (p - 1) / 2;
        let mut b = B::new(p, p);
        // Colors: 0/1 eastward/westward row chains, 2/3 southward/northward column chains, 4 broadcast.
        let add = |name: &str, needs: Vec<Need>, sends: Vec<Send>| task(name, needs, SimdOp::ArithF32, 1, None, sends);
        let done = task("result", vec![recv(4, 1)], SimdOp::Mov32, 0, None, vec![]);
        for y in 0..p {
            for x in 0..p {
                let left = x < c;
                let right = x > c;
                let mut tasks = Vec::new();
                if left {
                    let needs = if x > 0 { vec![recv(0, 1)] } else { vec![] };
                    tasks.push(add("row", needs, vec![send(0, 1)]));
                } else if right {
                    let needs = if x + 1 < p { vec![recv(1, 1)] } else { vec![] };
                    tasks.push(add("row", needs, vec![send(1, 1)]));
                } else {
                    // Centre column: combine both row chains, then the column chain.
                    let mut needs = vec![recv(0, 1), recv(1, 1)];
                    let up = y < c;
                    let down = y > c;
                    if up && y > 0 {
                        needs.push(recv(2, 1));
                    }
                    if down && y + 1 < p {
                        needs.push(recv(3, 1));
                    }
                    if !up && !down {
                        needs.push(recv(2, 1));
                        needs.push(recv(3, 1));
                    }
                    let sends = if up {
                        vec![send(2, 1)]
                    } else if down {
                        vec![send(3, 1)]
                    } else {
                        vec![send(4, 1)]
                    };
                    tasks.push(add("col", needs, sends));
                }
                tasks.push(done.clone());
                let t = b.template(&format!("pe{x}_{y}"), tasks);
                b.tile(x, y, 1, 1, t);
            }
        }
        b.route(0, rect(0, 0, c, p), Pattern::To { dx: 1, dy: 0 });
        b.route(1, rect(c + 1, 0, c, p), Pattern::To { dx: -1, dy: 0 });
        b.route(2, rect(c, 0, 1, c), Pattern::To { dx: 0, dy: 1 });
        b.route(3, rect(c, c + 1, 1, c), Pattern::To { dx: 0, dy: -1 });
        // The centre multicasts the result to the whole region, itself included.
        b.p.routes.push(Route {
            color: ColorId(4),
            senders: Senders::Pes(rect(c, c, 1, 1)),
            pattern: Pattern::Rect { dx: -(c as i32), dy: -(c as i32), w: p, h: p },
            relays: 0,
        });
        let run = b.run().unwrap();
        let stage = HOP + 2 * RAMP + PICK + 1; // one 2-wide fp32 add of one element: 1 cycle
                                               // First stage starts after the edge PE's pick + add; c stages along the row, c along the column
                                               // (the centre waits for both), then the multicast: ramp + up to 2c hops + ramp, and the pick of
                                               // the receiving task.
                                               // Two merges receive two one-wavelet trains in the same cycle (the top of the centre column gets
                                               // both row chains, the centre both column chains): a PE's down ramp takes one wavelet per cycle,
                                               // so each merge costs one more cycle.
        let merges = 2;
        let expect = (PICK + 1) + 2 * c as u64 * stage + merges + RAMP + 2 * c as u64 * HOP + RAMP + PICK;
        let rel = (run.cycles as f64 - expect as f64).abs() / expect as f64;
        let diameter = 2 * (p as u64 - 1);
        println!(
            "allreduce {p}x{p}: engine {} cycles, closed form {expect}, rel {rel:.4}; {:.2}x the diameter",
            run.cycles,
            run.cycles as f64 / diameter as f64
        );
        assert!(rel < 0.02, "{p}x{p}: {} vs {expect}", run.cycles);
    }
}

#[test]
fn deadlock_is_reported_not_hung() {
    // Two PEs each wait for the other's wavelet before sending their own: a dependency cycle.
    let mut b = B::new(2, 1);
    let a = b.template("a", vec![task("wait_then_send", vec![recv(1, 1)], SimdOp::Mov32, 0, None, vec![send(0, 1)])]);
    let c = b.template("b", vec![task("wait_then_send", vec![recv(0, 1)], SimdOp::Mov32, 0, None, vec![send(1, 1)])]);
    b.tile(0, 0, 1, 1, a);
    b.tile(1, 0, 1, 1, c);
    b.route(0, rect(0, 0, 1, 1), Pattern::To { dx: 1, dy: 0 });
    b.route(1, rect(1, 0, 1, 1), Pattern::To { dx: -1, dy: 0 });
    match b.run() {
        Err(EngineError::Deadlock(d)) => {
            let text = d.to_string();
            println!("{text}");
            assert_eq!(d.blocked_agents, 2);
            assert!(text.contains("PE (0,0)") && text.contains("color c1"), "{text}");
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

#[test]
fn paced_consumer_backpressures_the_sender() {
    // A receiver whose fp16 FMAC consumes each wavelet (2 fp16 values) with 1000 elements of work per
    // wavelet runs at 250 cycles per wavelet: the train cannot move faster, so the run takes about
    // n * 250 cycles, not n.
    let n = 40u64;
    let mut b = B::new(2, 1);
    let s = b.template("send", vec![task("send", vec![], SimdOp::Mov32, 0, None, vec![send(0, n)])]);
    let r = b.template("recv", vec![task("fmac", vec![recv(0, n)], SimdOp::FmacF16, 1000 * n, Some(0), vec![])]);
    b.tile(0, 0, 1, 1, s);
    b.tile(1, 0, 1, 1, r);
    b.route(0, rect(0, 0, 1, 1), Pattern::To { dx: 1, dy: 0 });
    let run = b.run().unwrap();
    let expect = n * 250;
    let rel = (run.cycles as f64 - expect as f64).abs() / expect as f64;
    assert!(rel < 0.02, "{} vs {expect}", run.cycles);
    // The link was held at 1/250 of its rate for the whole time: utilisation stays low, and the
    // consumer's compute is the critical path.
    assert!(run.fabric_utilization < 0.01);
    let compute = run.critical_path.0[waferscale::engine::Res::Compute as usize] as f64 / run.cycles as f64;
    assert!(compute > 0.98, "{:?}", run.critical_path);
}

#[test]
fn invariants_are_checked() {
    // A program whose tasks execute fewer FLOPs than its graph claims fails the FLOP invariant.
    let mut b = B::new(1, 1);
    let mut t = task("fmac", vec![], SimdOp::FmacF16, 8, None, vec![]);
    t.flops = 16;
    let tid = b.template("t", vec![t]);
    b.tile(0, 0, 1, 1, tid);
    b.p.graph_flops = 16;
    assert_eq!(b.run().unwrap().totals.flops, 16);
    b.p.graph_flops = 17;
    assert!(matches!(b.run(), Err(EngineError::Invariant(_))));
    // A delivery nobody consumes is a program error.
    let mut b = B::new(2, 1);
    let s = b.template("send", vec![task("send", vec![], SimdOp::Mov32, 0, None, vec![send(0, 2)])]);
    let r = b.template("recv", vec![task("recv", vec![recv(0, 1)], SimdOp::Mov32, 0, None, vec![])]);
    b.tile(0, 0, 1, 1, s);
    b.tile(1, 0, 1, 1, r);
    b.route(0, rect(0, 0, 1, 1), Pattern::To { dx: 1, dy: 0 });
    assert!(matches!(b.run(), Err(EngineError::Program(_))));
}

/// The critical path accounts for the run's cycles and names the resource a closed form says binds.
#[test]
fn critical_path_names_the_binding_resource() {
    use waferscale::engine::Res;
    let share = |run: &EngineRun, r: Res| run.critical_path.0[r as usize] as f64 / run.cycles as f64;
    // A long train over one hop: the fabric.
    let mut b = B::new(2, 1);
    let s = b.template("send", vec![task("send", vec![], SimdOp::Mov32, 0, None, vec![send(0, 50_000)])]);
    let r = b.template("recv", vec![task("recv", vec![recv(0, 50_000)], SimdOp::Mov32, 0, None, vec![])]);
    b.tile(0, 0, 1, 1, s);
    b.tile(1, 0, 1, 1, r);
    b.route(0, rect(0, 0, 1, 1), Pattern::To { dx: 1, dy: 0 });
    let run = b.run().unwrap();
    assert_eq!(run.critical_path.total(), run.cycles);
    assert!(share(&run, Res::Fabric) > 0.99, "{:?}", run.critical_path);
    // One PE's FMAC loop: compute.
    let mut b = B::new(1, 1);
    let t = b.template("fmac", vec![task("fmac", vec![], SimdOp::FmacF16, 40_000, None, vec![])]);
    b.tile(0, 0, 1, 1, t);
    let run = b.run().unwrap();
    assert_eq!(run.critical_path.total(), run.cycles);
    assert!(share(&run, Res::Compute) > 0.99, "{:?}", run.critical_path);
    // The same loop with the SDK's 32-bit SRAM ports: the SRAM binds.
    let hw = WaferHw::from_doc(&load_with_overrides("wse2", &["pe.sram_read_port_bits=32".into()]).unwrap()).unwrap();
    b.p.timing = Timing::from_hw(&hw);
    let run = b.run().unwrap();
    assert!(share(&run, Res::Sram) > 0.99, "{:?}", run.critical_path);
}

/// Two wafers joined only by a port pair: a PE on wafer 0 sends n wavelets out through its port;
/// they cross to wafer 1's port and into a PE there. Closed form: pick + ramp + hops to the port +
/// both ports' latencies + the serialisation at the slower port + hops + ramp + pick (tolerance 1%).
#[test]
fn two_wafers_link_through_their_ports() {
    use waferscale::engine::run_cluster;
    let n = 10_000u64;
    let latency = 300u64;
    let (wavelets, per) = (1u64, 2u64); // half a wavelet per cycle: the ports bind
    let mk = |out: bool| {
        let mut b = B::new(4, 1);
        let port_task = if out {
            task("fwd", vec![], SimdOp::Mov32, 0, None, vec![])
        } else {
            task(
                "inject",
                vec![Need::Recv { color: ColorId::LINK, wavelets: n }],
                SimdOp::Mov32,
                0,
                None,
                vec![send(1, n)],
            )
        };
        let pt = b.template("port", if out { vec![] } else { vec![port_task] });
        let pe = if out {
            b.template("src", vec![task("src", vec![], SimdOp::Mov32, 0, None, vec![send(0, n)])])
        } else {
            b.template("dst", vec![task("dst", vec![recv(1, n)], SimdOp::Mov32, 0, None, vec![])])
        };
        let idle = b.template("idle", vec![]);
        b.tile(3, 0, 1, 1, pe);
        b.tile(0, 0, 3, 1, idle);
        b.p.ports.push(Port {
            name: if out { "east".into() } else { "west".into() },
            side: if out { Dir::East } else { Dir::West },
            at: Coord { x: 0, y: 0 },
            wavelets,
            per_cycles: per,
            latency_cycles: latency,
            peer: if out { Peer::Wafer(1) } else { Peer::Wafer(0) },
            peer_port: if out { Some(PortId(0)) } else { None },
            template: pt,
            planned_bytes: n * 4,
        });
        if out {
            b.route(0, rect(3, 0, 1, 1), Pattern::ToPort { port: PortId(0) });
        } else {
            b.p.routes.push(Route {
                color: ColorId(1),
                senders: Senders::Port(PortId(0)),
                pattern: Pattern::Line { dir: Dir::East, hops: 3, multicast: false },
                relays: 0,
            });
        }
        b.p
    };
    let cluster = Cluster { wafers: vec![mk(true), mk(false)] };
    let run =
        run_cluster(&cluster, &EngineOptions { fidelity: Fidelity::Detailed, threads: 1, trace: None, progress: None })
            .unwrap();
    // Out: pick, ramp, 3 hops west, the port (latency) and across into the peer (latency), all n at the
    // port's rate; the peer's task starts when all have arrived, then re-sends them at the port's rate
    // (its latency, 3 hops, the ramp) to the PE, whose task picks.
    let expect = PICK + RAMP + 3 * HOP + 2 * latency + 2 * n * per / wavelets + latency + 3 * HOP + RAMP + PICK;
    let rel = (run.cycles as f64 - expect as f64).abs() / expect as f64;
    println!("two wafers: engine {} cycles, formula {expect}, rel {rel:.4}", run.cycles);
    assert!(rel < 0.01);
    let inter = run.critical_path.0[waferscale::engine::Res::InterWafer as usize] as f64 / run.cycles as f64;
    assert!(inter > 0.9, "{:?}", run.critical_path);
}

/// A consumer that claims nothing until cycle T: a `gate` task of G cycles, then `consume` runs of `w`
/// wavelets paced by color 0 (so T = pick + G + pick). Its SRAM is full, so the path buffers only its
/// router queues and one run. The producer, `h` hops west, streams `n` wavelets in one train.
/// Returns (the producer's finish, the consumer's first start T, the run).
fn held_stream(h: u32, n: u64, w: u64, gate_cycles: u64) -> (u64, u64, EngineRun) {
    let b = B { p: held_program(h, n, w, gate_cycles) };
    let run = b.run().unwrap();
    (run.agents[0].last_finish, PICK + gate_cycles + PICK, run)
}

/// The program of `held_stream`.
fn held_program(h: u32, n: u64, w: u64, gate_cycles: u64) -> MeshProgram {
    let mut b = B::new(h + 1, 1);
    let streamed = Send { color: ColorId(0), wavelets: n, streamed: true, runs: None };
    let s = b.template("send", vec![task("stream", vec![], SimdOp::Mov32, 0, None, vec![streamed])]);
    let gate = task("gate", vec![], SimdOp::FmacF16, 4 * gate_cycles, None, vec![]);
    let after_gate = Need::After { task: TaskIdx(0), first: 1, num: 0, den: 1 };
    let consume = Task {
        repeat: (n / w) as u32,
        ..task("consume", vec![after_gate, recv(0, w)], SimdOp::Mov32, 0, Some(0), vec![])
    };
    let r = b.template("recv", vec![gate, consume]);
    b.p.templates[r.0 as usize].sram_bytes = b.p.timing.sram_bytes;
    east_line(&mut b, h, s, r);
    b.p
}

#[test]
fn a_consumer_that_starts_late_stalls_the_sender() {
    // Credit backpressure: the path buffers B = queue_depth * (h + 2) + w wavelets (a queue per router
    // entered, the PE's input queue, one run of the consumer). The rest of the stream cannot leave the
    // sender before the consumer drains them at one wavelet per cycle from T, so the sender's send
    // finishes no earlier than T + n - B (closed form; the engine may add a pick per consumer run).
    let (q, h, n, w) = (4u64, 3u32, 4000u64, 500u64);
    let buffer = q * (h as u64 + 2) + w;
    for gate in [5_000u64, 20_000] {
        let (finish, t, run) = held_stream(h, n, w, gate);
        let expect = t + n - buffer;
        println!("gate {gate}: sender finishes at {finish}, closed form T + n - B = {t} + {n} - {buffer} = {expect}");
        assert!(finish >= expect, "the sender finished at {finish}, before T + n - B = {expect}");
        assert!(finish <= expect + (n / w) * (PICK + 1), "{finish} vs {expect}");
        // The wait shows as the sender's stall, and the consumer's late start is on the critical path.
        assert!(run.agents[0].stalled >= expect - n - PICK, "{:?}", run.agents[0]);
        assert!(run.critical_path.0[waferscale::engine::Res::Compute as usize] >= gate);
    }
    // A consumer that is already waiting does not stall it: the stream leaves at one wavelet per cycle.
    let (finish, _, run) = held_stream(h, n, w, 0);
    assert_eq!(finish, PICK + n, "an unstalled stream ends n cycles after its start");
    assert_eq!(run.agents[0].stalled, n, "the stream's own serialisation only");
}

/// The deadlock of finite buffers below, the sender at `sender_x` and the receiver beside it.
fn finite_queue_deadlock(sender_x: u32) -> engine::DeadlockReport {
    let receiver_x = 1 - sender_x;
    let dx = receiver_x as i32 - sender_x as i32;
    let mut b = B::new(2, 1);
    let big = Send { color: ColorId(1), wavelets: 1000, streamed: true, runs: None };
    let first = task("send_b", vec![], SimdOp::Mov32, 0, None, vec![big]);
    let then =
        task("send_a", vec![Need::Done { task: TaskIdx(0), times: 1 }], SimdOp::Mov32, 0, None, vec![send(0, 1)]);
    let s = b.template("send", vec![first, then]);
    let recv_a = task("recv_a", vec![recv(0, 1)], SimdOp::Mov32, 0, None, vec![]);
    let recv_b = Task {
        repeat: 10,
        ..task(
            "recv_b",
            vec![Need::After { task: TaskIdx(0), first: 1, num: 0, den: 1 }, recv(1, 100)],
            SimdOp::Mov32,
            0,
            Some(1),
            vec![],
        )
    };
    let r = b.template("recv", vec![recv_a, recv_b]);
    b.p.templates[r.0 as usize].sram_bytes = b.p.timing.sram_bytes;
    b.tile(sender_x, 0, 1, 1, s);
    b.tile(receiver_x, 0, 1, 1, r);
    b.route(0, rect(sender_x, 0, 1, 1), Pattern::To { dx, dy: 0 });
    b.route(1, rect(sender_x, 0, 1, 1), Pattern::To { dx, dy: 0 });
    match b.run() {
        Err(EngineError::Deadlock(d)) => d,
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

#[test]
fn finite_queues_can_deadlock_and_it_is_reported() {
    // The sender streams 1000 wavelets on color 1 and only then sends one on color 0; the receiver
    // consumes color 0 first. Its queues and one run (100) of color 1 fill, the sender stalls in its
    // first task and never sends color 0: a deadlock of finite buffers, reported, never hung.
    let d = finite_queue_deadlock(0);
    let text = d.to_string();
    println!("{text}");
    assert_eq!(d.blocked_agents, 2);
    assert!(text.contains("PE (0,0) task send_b (run 1) waits for: its sends on color c1 to drain"), "{text}");
    assert!(text.contains("held at PE (1,0)"), "{text}");
    assert!(text.contains("PE (1,0) task recv_a (run 1) waits for: 1 wavelets on color c0"), "{text}");
    // The held sender is listed first wherever it is: in a large knot it is the one to read, and the
    // agents that merely starve behind it come after it (in mesh order).
    let d = finite_queue_deadlock(1);
    let order: Vec<(&str, bool)> = d.blocked.iter().map(|b| (b.agent.as_str(), b.held)).collect();
    assert_eq!(order, [("PE (1,0)", true), ("PE (0,0)", false)], "{d}");
}

#[test]
fn held_trains_across_partitions_are_thread_count_independent() {
    // The held stream over 150 hops crosses two 64 x 64 partition boundaries: the hold and its release
    // travel between partitions as credit messages, handed over in partition order.
    let (h, n, w) = (150u32, 6000u64, 500u64);
    let (_, t, one) = held_stream(h, n, w, 3000);
    let program = held_program(h, n, w, 3000);
    for threads in [2usize, 3] {
        let opts = EngineOptions { fidelity: Fidelity::Detailed, threads, trace: None, progress: None };
        let many = engine::run(&program, &opts).unwrap();
        assert_eq!(many.cycles, one.cycles, "{threads} threads");
        assert_eq!(many.agents, one.agents, "{threads} threads");
        assert_eq!(many.critical_path, one.critical_path, "{threads} threads");
    }
    let buffer = 4 * (h as u64 + 2) + w;
    println!("150 hops: sender finishes at {}, T + n - B = {}", one.agents[0].last_finish, t + n - buffer);
    assert!(one.agents[0].last_finish >= t + n - buffer, "{} vs {}", one.agents[0].last_finish, t + n - buffer);
    assert!(one.agents[0].stalled > n, "{:?}", one.agents[0]);
}
