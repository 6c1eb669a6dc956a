//! Hardware descriptions: every shipped wafer file loads and validates; overrides and bad values are
//! handled with errors naming the key.

use waferscale::hw::{load_doc, load_with_overrides, ClusterHw, HwError, SimdOp, WaferHw};

fn wafer(name: &str, sets: &[&str]) -> Result<WaferHw, HwError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    WaferHw::from_doc(&load_with_overrides(name, &sets)?)
}

#[test]
fn shipped_wafers_load() {
    let wse2 = wafer("wse2", &[]).unwrap();
    assert_eq!((wse2.mesh.width, wse2.mesh.height), (757, 996));
    assert_eq!(wse2.pe.sram_bytes, 48 * 1024);
    assert_eq!(wse2.pe.rate(SimdOp::FmacF16), (4, 1));
    let wse3 = wafer("wse3", &[]).unwrap();
    assert_eq!((wse3.mesh.width, wse3.mesh.height), (762, 1176));
    assert_eq!(wse3.pe.rate(SimdOp::FmacF16), (8, 1));
    let cs2 = wafer("cs2", &[]).unwrap();
    let io = cs2.io.unwrap();
    assert_eq!(io.ports, 12);
    assert!((io.port_bytes_per_s() * io.ports as f64 - 150e9).abs() < 1.0);
    let cs3 = wafer("cs3", &[]).unwrap();
    assert_eq!((cs3.mesh.width, cs3.mesh.height, cs3.pe.simd.fmac_f16), (762, 1176, 8));
    assert!(cs3.io.is_some() && cs3.memoryx.is_some() && cs3.swarmx.is_some());
    // Dense fp16 peak at 1.1 GHz: 850k-class wafer ~7.5 PF (Andromeda's 120 PF / 16) [D].
    let fast = wafer("wse2", &["clock_hz=1.1e9"]).unwrap();
    let pf = fast.peak_flops_per_s() / 1e15;
    assert!((6.0..7.5).contains(&pf), "{pf}");
}

#[test]
fn sram_ports_limit_simd() {
    // With the SDK's 32-bit ports, fp16 FMAC is limited to 2 per cycle by reads.
    let hw = wafer("wse2", &["pe.sram_read_port_bits=32", "pe.sram_write_port_bits=32"]).unwrap();
    assert_eq!(hw.pe.rate(SimdOp::FmacF16), (8, 4));
    assert_eq!(hw.pe.cycles(SimdOp::FmacF16, 100), 50);
}

#[test]
fn overrides_and_errors_name_the_key() {
    let hw = wafer("wse2", &["pe.sram_bytes=98304"]).unwrap();
    assert_eq!(hw.pe.sram_bytes, 98304);
    let msg = |r: Result<WaferHw, HwError>| r.unwrap_err().to_string();
    assert!(msg(wafer("wse2", &["pe.sram_bytes=0"])).contains("pe.sram_bytes"));
    assert!(msg(wafer("wse2", &["pe.sram_byts=1"])).contains("pe.sram_byts"));
    assert!(msg(wafer("wse2", &["fabric.colors=-3"])).contains("fabric.colors"));
    assert!(msg(wafer("wse2", &["clock_hz=0"])).contains("clock_hz"));
    assert!(msg(wafer("wse2", &["pe.code_reserve_bytes=49152"])).contains("pe.code_reserve_bytes"));
    assert!(msg(wafer("cs2", &["io.port_bits_per_s=0"])).contains("io.port_bits_per_s"));
    assert!(msg(wafer("wse2", &["pe.simd=4"])).contains("pe.simd"));
    assert!(msg(wafer("nonexistent", &[])).contains("nonexistent"));
    assert!(wafer("wse2", &[]).unwrap().with_mesh(800, 10).is_err());
    assert_eq!(wafer("wse2", &[]).unwrap().with_mesh(420, 420).unwrap().mesh.pes(), 420 * 420);
}

#[test]
fn bare_wafers_have_their_perimeter_io_and_systems_add_memoryx() {
    let wse2 = wafer("wse2", &[]).unwrap();
    let io = wse2.io.unwrap();
    assert_eq!(io.ports, 12);
    assert!(wse2.memoryx.is_none() && wse2.swarmx.is_none());
    assert!(wafer("wse3", &[]).unwrap().io.is_some());
    let cs2 = wafer("cs2", &[]).unwrap();
    assert!(cs2.memoryx.is_some() && cs2.swarmx.is_some());
}

#[test]
fn andromeda_is_sixteen_cs2() {
    let a = ClusterHw::from_doc(&load_doc("andromeda").unwrap()).unwrap();
    assert_eq!(a.systems, 16);
    assert_eq!(a.system.name, "cs2");
    // 120 PF dense fp16 at 1.1 GHz (Andromeda press release) [P]; at our 850 MHz clock, 16 x 5.1 PF.
    let pf = a.peak_flops_per_s() / 1e15;
    assert!((75.0..90.0).contains(&pf), "{pf}");
    // A cluster is not a wafer, and a bare wafer cannot form one (no MemoryX or SwarmX).
    assert!(WaferHw::from_doc(&load_doc("andromeda").unwrap()).is_err());
    let mut doc = load_doc("andromeda").unwrap();
    doc.tree.insert("system".into(), toml::Value::String("wse2".into()));
    assert!(ClusterHw::from_doc(&doc).unwrap_err().to_string().contains("memoryx"));
}
