fn main() -> std::process::ExitCode {
    asimov::cli::run()
}
