//! `wafer`: the command-line driver. Parses with clap, calls the library, prints.
//! Exit codes: 0 success, 2 bad input, 1 internal error.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                // thiserror's transparent variants repeat their inner message; print only new context.
                if !e.to_string().contains(&s.to_string()) {
                    eprintln!("  caused by: {s}");
                }
                source = s.source();
            }
            ExitCode::from(e.exit_code())
        }
    }
}
