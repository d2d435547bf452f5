//! The `tern` binary. Everything it does starts in [`app::main`].

mod app;

fn main() -> std::process::ExitCode {
    app::main()
}
