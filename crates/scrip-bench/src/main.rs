//! `scrip-bench`: see the library for what it does.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = scrip_bench::Args::parse();
    // scrip refuses a configuration, trust anchor or policy that its group
    // or others may write, as it should: the files written here for it
    // (and by the `scrip secret set` run first) are the owner's alone to
    // change, whatever umask the caller runs with (002 on many desktops).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
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
