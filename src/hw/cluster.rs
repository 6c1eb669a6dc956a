//! Clusters of wafer systems (`kind = "cluster"`): N copies of a system description joined by its SwarmX
//! tree (Andromeda: 16 CS-2).

use serde::Deserialize;

use super::load::{decode, kind, load_doc, HwDoc};
use super::wafer::WaferHw;
use super::{Check, HwError};

/// A cluster of identical wafer systems.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterHw {
    pub name: String,
    pub path: String,
    /// The system every member is (with its IO, MemoryX and SwarmX).
    pub system: WaferHw,
    pub systems: u32,
    /// `data`: weights broadcast to every system, gradients reduced through SwarmX.
    pub parallelism: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    name: Option<String>,
    system: String,
    systems: u32,
    parallelism: String,
}

impl ClusterHw {
    /// Decodes and validates a cluster description; its system is loaded by name (or path).
    pub fn from_doc(doc: &HwDoc) -> Result<ClusterHw, HwError> {
        let k = kind(doc)?;
        if k != "cluster" {
            return Err(HwError::WrongKind {
                path: doc.path.clone(),
                name: doc.name.clone(),
                found: k,
                wanted: "cluster (andromeda)".into(),
            });
        }
        let f: ClusterFile = decode(doc, &doc.tree)?;
        let c = Check { path: &doc.path };
        c.range_u64("systems", f.systems as u64, 1, 4096)?;
        if f.parallelism != "data" {
            return Err(c.err("parallelism", format!("`{}`: only data parallelism is modelled", f.parallelism)));
        }
        let system = WaferHw::from_doc(&load_doc(&f.system)?)?;
        for (key, present) in [("memoryx", system.memoryx.is_some()), ("swarmx", system.swarmx.is_some())] {
            if !present {
                return Err(c.err(
                    "system",
                    format!(
                        "`{}` has no [{key}]: a cluster's systems share weights and gradients through it",
                        f.system
                    ),
                ));
            }
        }
        Ok(ClusterHw {
            name: doc.name.clone(),
            path: doc.path.clone(),
            system,
            systems: f.systems,
            parallelism: f.parallelism,
        })
    }

    /// Dense fp16 peak of all systems together.
    pub fn peak_flops_per_s(&self) -> f64 {
        self.system.peak_flops_per_s() * self.systems as f64
    }
}
