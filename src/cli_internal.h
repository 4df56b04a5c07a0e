// What the parts of the CLI share (cli.cc, cli_target.cc); private to src/.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace deferfs::cli_detail {

// A failure that ends the command: `message` goes to stderr after
// "deferfs: ", `status` is the exit status (1 failed, 2 bad usage).
struct CliError : std::runtime_error {
  CliError(int status, const std::string& message) : std::runtime_error(message), status(status) {}
  int status;
};

inline CliError usage_error(const std::string& message) { return CliError(2, message); }

struct MountEntry {
  long id = 0;
  std::string mountpoint;
  std::string fstype;
};

// The mount that the command's PATHs are on, and the paths relative to it.
struct Target {
  MountEntry mount;
  std::string socket;
  std::vector<std::string> paths;     // as given on the command line
  std::vector<std::string> relative;  // relative to the mount root
};

// The mounts of this process's namespace (/proc/self/mountinfo).
std::vector<MountEntry> read_mountinfo();
// Resolves every PATH, checks they are on one deferfs mount, and asks it
// for its control socket. Throws CliError (status 2: not on a mount).
Target find_target(const std::vector<std::string>& paths);

}  // namespace deferfs::cli_detail
