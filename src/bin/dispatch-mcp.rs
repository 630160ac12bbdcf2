fn main() -> std::process::ExitCode {
    dispatch_front::main()
}
