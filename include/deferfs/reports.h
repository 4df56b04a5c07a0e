// Results of the control operations (sync, status, discard, stats), shared by
// the daemon core that produces them, the control protocol that carries them
// and the CLI that prints them. Field names match spec.md section 2.1; the
// JSON conversion in reports.cc is the single place those names are spelled.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace deferfs {

// One file that a command could not handle, with the cause in words
// ("No space left on device", "changed outside the mount since its snapshot").
struct FileError {
  std::string path;   // relative to the mount root, "/"-separated, no leading "/"
  std::string error;
  int code = 0;       // the errno behind it, when known (not serialized)
};

struct SyncReport {
  uint64_t files = 0;           // files committed (with at least one change applied or checked)
  uint64_t pages_written = 0;   // pages whose bytes differed from the source and were written
  uint64_t pages_skipped = 0;   // dirty pages found identical to the source
  uint64_t bytes_written = 0;   // file data bytes written to the source
  std::vector<std::string> conflicts;  // files refused because the source changed outside
  std::vector<FileError> failed;       // files whose commit failed; their pages stay staged
  bool ok() const { return conflicts.empty() && failed.empty(); }
};

enum class FileState { Staged, Conflict };

struct StatusEntry {
  std::string path;       // relative to the mount root
  uint64_t size = 0;      // staged (logical) size
  uint64_t dirty_pages = 0;
  uint64_t dirty_bytes = 0;
  FileState state = FileState::Staged;
};

struct StatusReport {
  std::vector<StatusEntry> files;
  uint64_t dirty_pages = 0;
  uint64_t dirty_bytes = 0;
  // Staged data kept aside because its file is gone (orphans.h): names
  // below SOURCE/.deferfs/orphans.
  std::vector<std::string> orphans;
};

struct DiscardReport {
  uint64_t files = 0;          // files whose staged changes were dropped
  uint64_t pages_dropped = 0;  // dirty pages dropped
  std::vector<FileError> failed;
};

struct StatsReport {
  uint64_t page_size = 0;
  uint64_t files_open = 0;           // open file handles on regular files
  uint64_t snapshots = 0;            // live snapshots (files with a segment)
  uint64_t snapshots_kept = 0;       // of those, kept after the kernel forgot the file (spec 5.1)
  uint64_t materialized_bytes = 0;   // bytes resident in segments, clean and dirty
  uint64_t loaded_bytes = 0;         // bytes read from the source by the loader since mount
  uint64_t dirty_pages = 0;
  uint64_t dirty_bytes = 0;
  uint64_t skipped_pages = 0;        // unchanged-page writes plus sync pages equal to source
  uint64_t synced_bytes = 0;         // file data written to the source by sync since mount
  uint64_t evicted_bytes = 0;
  uint64_t cache_limit_bytes = 0;
  uint64_t daemon_rss_bytes = 0;
  // Beyond spec 2.1: the staged-memory limit and spill figures (spec 7.2).
  uint64_t dirty_limit_bytes = 0;
  uint64_t spilled_bytes = 0;        // staged bytes now in spill files
  uint64_t spilled_total_bytes = 0;  // staged bytes moved to spill files since mount
  // How FUSE requests reach the daemon (spec 2.1: "uring" or "dev"), why,
  // and the requests each ring (index = CPU) served.
  std::string transport;
  std::string transport_reason;
  std::vector<uint64_t> transport_queue_requests;
  uint64_t transport_sched_raised = 0;  // starved ring threads lifted out of SCHED_IDLE
  // Not in spec 2.1, added for people: who serves the mount.
  int64_t pid = 0;
  std::string source;
  std::string mountpoint;
};

const char* to_string(FileState s);

void to_json(nlohmann::json& j, const FileError& e);
void to_json(nlohmann::json& j, const SyncReport& r);
void to_json(nlohmann::json& j, const StatusEntry& e);
void to_json(nlohmann::json& j, const StatusReport& r);
void to_json(nlohmann::json& j, const DiscardReport& r);
void to_json(nlohmann::json& j, const StatsReport& r);
// The from_json side throws nlohmann::json::exception on a missing or
// wrong-typed field; callers (the CLI) turn that into a protocol error.
void from_json(const nlohmann::json& j, FileError& e);
void from_json(const nlohmann::json& j, SyncReport& r);
void from_json(const nlohmann::json& j, StatusEntry& e);
void from_json(const nlohmann::json& j, StatusReport& r);
void from_json(const nlohmann::json& j, DiscardReport& r);
void from_json(const nlohmann::json& j, StatsReport& r);

}  // namespace deferfs
