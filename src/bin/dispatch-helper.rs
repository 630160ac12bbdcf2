fn main() -> std::process::ExitCode {
    dispatch_helper::main()
}
