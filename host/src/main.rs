//! The `twinhost` binary: see [`twinhost::cli`].

fn main() -> std::process::ExitCode {
    match twinhost::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
