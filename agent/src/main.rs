fn main() -> std::process::ExitCode {
    podscope::cli::main()
}
