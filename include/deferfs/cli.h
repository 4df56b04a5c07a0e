// The `deferfs` command's subcommands that talk to a running daemon:
// sync, status, discard, stats, umount (spec 2). The mount form is in daemon.h.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

namespace deferfs {

// True if `word` names a subcommand handled by cli_main.
bool is_cli_command(const std::string& word);

// Runs one subcommand. `args[0]` is the subcommand, the rest its arguments.
// Prints human output (or one JSON object with --json) on stdout, errors on
// stderr naming the path or option and the cause. Returns the exit status:
// 0 success, 1 the operation failed, 2 bad usage or a path not on a deferfs mount.
int cli_main(const std::vector<std::string>& args);

// The whole command's usage text (mount form and subcommands).
void print_usage(std::FILE* out);

}  // namespace deferfs
