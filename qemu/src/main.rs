fn main() -> std::process::ExitCode {
    qemu::cli::main()
}
