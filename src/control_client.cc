// The client's side of the control protocol (see control.h): one request,
// its progress replies and its final reply.
#include "deferfs/control.h"
#include "deferfs/control_wire.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include <nlohmann/json.hpp>

namespace deferfs {

namespace {

using nlohmann::json;
using namespace wire;

constexpr int kClientReplyTimeoutMs = 60'000;

json request_json(const ControlRequest& req) {
  json j{{"version", kProtocolVersion}, {"op", req.op}, {"paths", req.paths}};
  if (req.op == "sync") j["force"] = req.force;
  if (req.op == "umount") j["discard"] = req.discard;
  return j;
}

// After a failed send: the daemon may have replied and closed (e.g. EACCES
// before reading our request). Returns that reply if it is there.
std::optional<json> pending_reply(int fd) {
  Received m = recv_message(fd, -1, kMaxReplyBytes, 100);
  if (m.status != RecvStatus::Ok) return std::nullopt;
  json j = json::parse(m.text, nullptr, false);
  if (j.is_object() && j.contains("ok")) return j;
  return std::nullopt;
}

// Reads replies until the final one; progress replies go to `on_progress`.
json read_final_reply(int fd, const std::string& path, int timeout_ms,
                      const std::function<void(uint64_t, uint64_t)>& on_progress) {
  for (;;) {
    Received m = recv_message(fd, -1, kMaxReplyBytes, timeout_ms);
    switch (m.status) {
      case RecvStatus::Ok:
        break;
      case RecvStatus::Eof:
        throw ProtocolError("the daemon at " + path + " closed the connection without a reply");
      case RecvStatus::Timeout:
        throw sys_error(ETIMEDOUT, "no reply from " + path + " within " + std::to_string(timeout_ms / 1000) + " s");
      case RecvStatus::Error:
      case RecvStatus::Stopped:
        throw sys_error(m.err ? m.err : EIO, "receive from " + path);
      case RecvStatus::TooLarge:
      case RecvStatus::Truncated:
      case RecvStatus::Malformed:
        throw ProtocolError("bad reply from " + path + ": " + m.detail);
    }
    json j = json::parse(m.text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      throw ProtocolError("bad reply from " + path + ": not a JSON object");
    }
    if (auto p = j.find("progress"); p != j.end()) {
      if (!p->is_object() || !p->contains("done") || !p->contains("total") || !(*p)["done"].is_number_unsigned() ||
          !(*p)["total"].is_number_unsigned()) {
        throw ProtocolError("bad reply from " + path + ": malformed progress");
      }
      if (on_progress) on_progress((*p)["done"].get<uint64_t>(), (*p)["total"].get<uint64_t>());
      continue;
    }
    if (auto ok = j.find("ok"); ok == j.end() || !ok->is_boolean()) {
      throw ProtocolError("bad reply from " + path + ": no boolean 'ok'");
    }
    return j;
  }
}

}  // namespace

nlohmann::json control_call(const std::string& socket_path, const ControlRequest& req,
                            const std::function<void(uint64_t, uint64_t)>& on_progress) {
  std::string text;
  try {
    text = request_json(req).dump();
  } catch (const json::exception&) {
    throw ProtocolError("a path of the request is not valid UTF-8");
  }
  if (text.size() > kMaxMessageBytes) {
    throw ProtocolError("request of " + std::to_string(text.size()) + " bytes is larger than the limit of " +
                        std::to_string(kMaxMessageBytes) + "; name fewer paths");
  }
  UniqueFd sock = new_socket(socket_path);
  // A refused connection to a socket that exists is transient (a daemon
  // between bind and listen, or replacing a stale socket): retry briefly.
  for (int attempt = 0;; ++attempt) {
    int err = try_connect(sock.get(), socket_path);
    if (err == 0) break;
    if (err != ECONNREFUSED || attempt >= 20)
      throw ControlConnectError(err, std::generic_category(), "connect to " + socket_path);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    sock = new_socket(socket_path);
  }
  set_timeout(sock.get(), SO_SNDTIMEO, ControlServer::kIoTimeoutMs);

  if (int err = send_message(sock.get(), text)) {
    if (auto reply = pending_reply(sock.get())) return *reply;
    throw sys_error(err == EAGAIN ? ETIMEDOUT : err, "send to " + socket_path);
  }
  const bool long_op = req.op == "sync" || req.op == "umount";
  return read_final_reply(sock.get(), socket_path, long_op ? -1 : kClientReplyTimeoutMs, on_progress);
}

}  // namespace deferfs