/// Counts the live heap (`podscope_agent_heap_bytes`), see [`podscope::heap`].
#[global_allocator]
static ALLOCATOR: podscope::heap::Counting = podscope::heap::Counting;

fn main() -> std::process::ExitCode {
    podscope::cli::main()
}
