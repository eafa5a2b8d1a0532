fn main() {
    eprintln!("pi-qemu: not implemented yet");
    std::process::exit(2);
}
