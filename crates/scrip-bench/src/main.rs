//! `scrip-bench`: see the library for what it does.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = scrip_bench::Args::parse();
    match scrip_bench::main(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            #[expect(clippy::print_stderr, reason = "the binary reports its failure")]
            {
                eprintln!("scrip-bench: {e}");
            }
            ExitCode::from(2)
        }
    }
}
