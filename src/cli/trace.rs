//! `wafer trace`: look at a PE utilization trace written by `wafer run --trace FILE`.

use clap::{Args, Subcommand};

use super::emit;
use waferscale::trace::{self, heatmap, perfetto, slice, summary::TraceSummary, timeline, TraceError, View};
use waferscale::Error;

#[derive(Args)]
pub struct TraceCmd {
    #[command(subcommand)]
    pub cmd: TraceSub,
}

#[derive(Subcommand)]
pub enum TraceSub {
    /// Utilization by region and over time, the hottest and idlest PEs and regions, link and IO hotspots,
    /// stall causes.
    #[command(after_help = "Examples:\n  wafer trace summary run.wtrace\n  wafer trace summary run.wtrace --json")]
    Summary {
        /// A trace file (`wafer run ... --trace FILE`).
        file: String,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A PNG of the wafer for one window or the whole run (region outlines, labels, colour bar), or an
    /// animated GIF over all windows.
    #[command(after_help = "Examples:\n  \
        wafer trace heatmap run.wtrace -o compute.png                 # the whole run\n  \
        wafer trace heatmap run.wtrace --metric stall --window 3 -o w3.png\n  \
        wafer trace heatmap run.wtrace --metric fabric --all -o fabric.gif")]
    Heatmap {
        file: String,
        /// compute, send, receive, fabric, stall or sram.
        #[arg(long, default_value = "compute", value_parser = parse_view)]
        metric: View,
        /// One window (0-based) instead of the whole run.
        #[arg(long, conflicts_with = "all")]
        window: Option<u32>,
        /// Every window, as frames of an animated GIF.
        #[arg(long)]
        all: bool,
        /// End the colour bar at the 95th percentile of active pixels (rounded up to 0.1, 0.2, 0.5, 1, 2, 5, ... or 100%) instead of
        /// 100%, so a mostly idle wafer still shows where it worked.
        #[arg(long, conflicts_with = "all")]
        auto_scale: bool,
        /// The picture to write (.png; .gif with --all).
        #[arg(short = 'o', long, value_name = "FILE")]
        output: String,
    },
    /// Per-region (and per-port) sparklines over time, in the terminal.
    #[command(
        after_help = "Examples:\n  wafer trace timeline run.wtrace\n  wafer trace timeline run.wtrace --metric stall --width 100"
    )]
    Timeline {
        file: String,
        /// compute, send, receive, fabric, stall or sram.
        #[arg(long, default_value = "compute", value_parser = parse_view)]
        metric: View,
        /// Columns of each sparkline (windows are grouped to fit).
        #[arg(long, default_value_t = 64)]
        width: usize,
    },
    /// One PE's or one region's history, window by window (and the task runs of sampled PEs).
    #[command(
        after_help = "Examples:\n  wafer trace slice run.wtrace --pe 3,5\n  wafer trace slice run.wtrace --region l0.attn.qkv --json"
    )]
    Slice {
        file: String,
        /// The PE at column X, row Y.
        #[arg(long, value_name = "X,Y", value_parser = parse_pe, conflicts_with = "region", required_unless_present = "region")]
        pe: Option<(u32, u32)>,
        /// A region by name (`wafer trace summary` lists them).
        #[arg(long)]
        region: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Export for ui.perfetto.dev: counter tracks per region and IO port, sampled PEs' task slices,
    /// metadata (native Perfetto protobuf).
    #[command(
        after_help = "Example:\n  wafer trace export run.wtrace --perfetto -o run.perfetto-trace   # then open it in ui.perfetto.dev"
    )]
    Export {
        file: String,
        /// Write a native Perfetto protobuf trace (the only export format).
        #[arg(long, required = true)]
        perfetto: bool,
        #[arg(short = 'o', long, value_name = "FILE")]
        output: String,
    },
}

fn parse_view(s: &str) -> Result<View, String> {
    View::parse(s)
        .ok_or_else(|| format!("`{s}` is not a metric; expected compute, send, receive, fabric, stall or sram"))
}

fn parse_pe(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not a PE; expected X,Y (column, row), e.g. 3,5");
    let (x, y) = s.split_once(',').ok_or_else(bad)?;
    Ok((x.trim().parse().map_err(|_| bad())?, y.trim().parse().map_err(|_| bad())?))
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, Error> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| TraceError::Encode(format!("JSON: {e}")))?;
    s.push('\n');
    Ok(s)
}

fn with_extension(path: &str, ext: &str, why: &str) -> Result<(), Error> {
    if path.to_ascii_lowercase().ends_with(ext) {
        Ok(())
    } else {
        Err(TraceError::Query(format!("-o {path}: {why} writes a {ext} file; give the output a {ext} extension"))
            .into())
    }
}

pub fn run(cmd: TraceCmd) -> Result<(), Error> {
    match cmd.cmd {
        TraceSub::Summary { file, json: as_json } => {
            let s = TraceSummary::new(&trace::read(&file)?);
            emit(&if as_json { json(&s)? } else { s.to_text() }, None)
        }
        TraceSub::Heatmap { file, metric, window, all, auto_scale, output } => {
            let t = trace::read(&file)?;
            let bytes = if all {
                with_extension(&output, ".gif", "--all")?;
                heatmap::gif_bytes(&t, metric)?
            } else {
                with_extension(&output, ".png", "a heatmap")?;
                let (first, last) = match window {
                    Some(w) => (t.check_window(w)?, t.check_window(w)?),
                    None => (0, t.windows as usize - 1),
                };
                heatmap::png_bytes(&heatmap::render_scaled(&t, metric, first, last, auto_scale))?
            };
            trace::write_output(&output, &bytes)?;
            Ok(())
        }
        TraceSub::Timeline { file, metric, width } => {
            emit(&timeline::timeline(&trace::read(&file)?, metric, width.max(1)), None)
        }
        TraceSub::Slice { file, pe, region, json: as_json } => {
            let t = trace::read(&file)?;
            let text = match (pe, region) {
                (Some((x, y)), _) => {
                    let s = slice::PeSlice::new(&t, x, y)?;
                    if as_json {
                        json(&s)?
                    } else {
                        s.to_text()
                    }
                }
                (None, Some(name)) => {
                    let s = slice::RegionSlice::new(&t, &name)?;
                    if as_json {
                        json(&s)?
                    } else {
                        s.to_text()
                    }
                }
                (None, None) => return Err(TraceError::Query("give --pe X,Y or --region NAME".into()).into()),
            };
            emit(&text, None)
        }
        TraceSub::Export { file, perfetto: _, output } => {
            let t = trace::read(&file)?;
            trace::write_output(&output, &perfetto::export(&t))?;
            Ok(())
        }
    }
}
