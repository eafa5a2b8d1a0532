fn main() -> std::process::ExitCode {
    updater::cli::main()
}
