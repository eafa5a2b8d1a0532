fn main() -> std::process::ExitCode {
    imager::cli::main()
}
