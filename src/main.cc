// deferfs: one binary for the mount (daemon) and the commands that talk to it.
#include <cstdio>
#include <cstring>
#include <unistd.h>
#include <string>
#include <vector>

#include "deferfs/cli.h"
#include "deferfs/daemon.h"
#include "deferfs/options.h"
#include "deferfs/orphans.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    deferfs::print_usage(stderr);
    return 2;
  }
  if (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    deferfs::print_usage(stdout);
    return 0;
  }
  if (args[0] == "-V" || args[0] == "--version") {
    std::printf("deferfs %s\n", DEFERFS_VERSION);
    return 0;
  }
  if (deferfs::is_cli_command(args[0])) return deferfs::cli_main(args);
  if (args[0] == "orphans") return deferfs::orphans_main(args);
  if (args[0] == "mount") {
    args.erase(args.begin());
  } else if (args[0].find('/') == std::string::npos && args[0] != "." && args[0] != ".." &&
             args[0][0] != '-' && access(args[0].c_str(), F_OK) != 0) {
    // Not a path that exists and not a command: a mistyped command, most likely.
    std::fprintf(stderr, "deferfs: unknown command '%s' (and no directory of that name to mount)\n",
                 args[0].c_str());
    deferfs::print_usage(stderr);
    return 2;
  }
  try {
    deferfs::MountOptions opts = deferfs::parse_mount_args(args);
    return deferfs::run_daemon(opts);
  } catch (const deferfs::UsageError& e) {
    std::fprintf(stderr, "deferfs: %s\n", e.what());
    std::fprintf(stderr, "usage: deferfs SOURCE MOUNTPOINT [-o OPT[,OPT...]] [-f] [-d]\n");
    return 2;
  }
}
