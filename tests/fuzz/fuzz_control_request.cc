// libFuzzer target: the control protocol's request parser (control.h,
// parse_request), which sees every byte a client sends. It must either
// return a request that satisfies every documented rule or throw
// ProtocolError: any other exception, a crash or a sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "deferfs/control.h"

namespace {

using deferfs::ControlRequest;
using deferfs::ProtocolError;

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_control_request: %s: %s\n", what, detail.c_str());
  std::abort();
}

bool known_op(const std::string& op) {
  return op == "sync" || op == "status" || op == "discard" || op == "stats" || op == "umount";
}

// What parse_request promises about the paths it returns.
void check_path(const std::string& p) {
  if (p.size() > 4096) fail("path longer than PATH_MAX accepted", p.substr(0, 64));
  if (p.find('\0') != std::string::npos) fail("path with a NUL accepted", p);
  if (!p.empty() && p.front() == '/') fail("absolute path accepted", p);
  if (!p.empty() && p.back() == '/') fail("path not normalized (trailing /)", p);
  size_t start = 0;
  while (start <= p.size() && !p.empty()) {
    size_t end = p.find('/', start);
    if (end == std::string::npos) end = p.size();
    const std::string_view name(p.data() + start, end - start);
    if (name.empty()) fail("path not normalized (empty component)", p);
    if (name == ".") fail("path not normalized ('.' component)", p);
    if (name == "..") fail("'..' component accepted", p);
    if (name.size() > 255) fail("name longer than NAME_MAX accepted", p);
    start = end + 1;
  }
  // Must survive being sent back in a reply (valid UTF-8).
  try {
    (void)nlohmann::json(p).dump();
  } catch (const nlohmann::json::exception&) {
    fail("path that is not valid UTF-8 accepted", p);
  }
}

void check_request(const ControlRequest& r, const std::string& input) {
  if (!known_op(r.op)) fail("unknown op accepted", r.op);
  const bool needs_paths = r.op == "sync" || r.op == "status" || r.op == "discard";
  if (needs_paths && r.paths.empty()) fail("request without paths accepted", input);
  if (r.force && r.op != "sync") fail("force accepted on another op", input);
  if (r.discard && r.op != "umount") fail("discard accepted on another op", input);
  for (const std::string& p : r.paths) check_path(p);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  ControlRequest r;
  try {
    r = deferfs::parse_request(input);
  } catch (const ProtocolError& e) {
    if (std::string_view(e.what()).empty()) fail("ProtocolError without a message", input);
    return 0;
  }
  // Anything else thrown (nlohmann's exceptions, std::length_error, ...)
  // escapes here, and libFuzzer reports it as a crash.
  check_request(r, input);

  // Normalization is idempotent: the request rebuilt from the parsed one
  // parses to the same request.
  nlohmann::json j{{"version", deferfs::kProtocolVersion}, {"op", r.op}};
  if (!r.paths.empty() || r.op == "sync" || r.op == "status" || r.op == "discard") j["paths"] = r.paths;
  if (r.op == "sync") j["force"] = r.force;
  if (r.op == "umount") j["discard"] = r.discard;
  ControlRequest again;
  try {
    again = deferfs::parse_request(j.dump());
  } catch (const ProtocolError& e) {
    fail("a normalized request does not parse again", std::string(e.what()) + " for " + j.dump());
  }
  if (again.op != r.op || again.paths != r.paths || again.force != r.force || again.discard != r.discard) {
    fail("normalizing twice changes the request", j.dump());
  }
  return 0;
}
