// JSON conversion of the control reports. This file is the single place where
// the field names of spec.md section 2.1 are spelled; the daemon, the control
// protocol and the CLI all go through these functions.
#include "deferfs/reports.h"

#include <nlohmann/json.hpp>

namespace deferfs {

namespace {

using nlohmann::json;

// Reads an optional field (one that is not in spec 2.1 and may be absent
// in a reply from an older or newer daemon). A present field of the wrong
// type still throws, as a required one would.
template <typename T>
void get_optional(const json& j, const char* key, T& out) {
  auto it = j.find(key);
  if (it != j.end() && !it->is_null()) it->get_to(out);
}

}  // namespace

const char* to_string(FileState s) {
  switch (s) {
    case FileState::Staged:
      return "staged";
    case FileState::Conflict:
      return "conflict";
  }
  return "unknown";
}

// --- FileError ---

void to_json(json& j, const FileError& e) {
  j = json{{"path", e.path}, {"error", e.error}};
}

void from_json(const json& j, FileError& e) {
  j.at("path").get_to(e.path);
  j.at("error").get_to(e.error);
}

// --- SyncReport ---

void to_json(json& j, const SyncReport& r) {
  j = json{{"files", r.files},
           {"pages_written", r.pages_written},
           {"pages_skipped", r.pages_skipped},
           {"bytes_written", r.bytes_written},
           {"conflicts", r.conflicts},
           {"failed", r.failed}};
}

void from_json(const json& j, SyncReport& r) {
  j.at("files").get_to(r.files);
  j.at("pages_written").get_to(r.pages_written);
  j.at("pages_skipped").get_to(r.pages_skipped);
  j.at("bytes_written").get_to(r.bytes_written);
  j.at("conflicts").get_to(r.conflicts);
  j.at("failed").get_to(r.failed);
}

// --- StatusEntry / StatusReport ---

void to_json(json& j, const StatusEntry& e) {
  j = json{{"path", e.path},
           {"size", e.size},
           {"dirty_pages", e.dirty_pages},
           {"dirty_bytes", e.dirty_bytes},
           {"state", to_string(e.state)}};
}

void from_json(const json& j, StatusEntry& e) {
  j.at("path").get_to(e.path);
  j.at("size").get_to(e.size);
  j.at("dirty_pages").get_to(e.dirty_pages);
  j.at("dirty_bytes").get_to(e.dirty_bytes);
  const std::string state = j.at("state").get<std::string>();
  if (state == "staged") {
    e.state = FileState::Staged;
  } else if (state == "conflict") {
    e.state = FileState::Conflict;
  } else {
    throw json::other_error::create(501, "unknown file state '" + state + "'", &j);
  }
}

void to_json(json& j, const StatusReport& r) {
  j = json{{"files", r.files}, {"dirty_pages", r.dirty_pages}, {"dirty_bytes", r.dirty_bytes},
           {"orphans", r.orphans}};
}

void from_json(const json& j, StatusReport& r) {
  j.at("files").get_to(r.files);
  j.at("dirty_pages").get_to(r.dirty_pages);
  j.at("dirty_bytes").get_to(r.dirty_bytes);
  if (j.contains("orphans")) j.at("orphans").get_to(r.orphans);
}

// --- DiscardReport ---

void to_json(json& j, const DiscardReport& r) {
  j = json{{"files", r.files}, {"pages_dropped", r.pages_dropped}, {"failed", r.failed}};
}

void from_json(const json& j, DiscardReport& r) {
  j.at("files").get_to(r.files);
  j.at("pages_dropped").get_to(r.pages_dropped);
  j.at("failed").get_to(r.failed);
}

// --- StatsReport ---

void to_json(json& j, const StatsReport& r) {
  j = json{{"page_size", r.page_size},
           {"files_open", r.files_open},
           {"snapshots", r.snapshots},
           {"snapshots_kept", r.snapshots_kept},
           {"materialized_bytes", r.materialized_bytes},
           {"loaded_bytes", r.loaded_bytes},
           {"dirty_pages", r.dirty_pages},
           {"dirty_bytes", r.dirty_bytes},
           {"skipped_pages", r.skipped_pages},
           {"synced_bytes", r.synced_bytes},
           {"evicted_bytes", r.evicted_bytes},
           {"cache_limit_bytes", r.cache_limit_bytes},
           {"daemon_rss_bytes", r.daemon_rss_bytes},
           {"dirty_limit_bytes", r.dirty_limit_bytes},
           {"spilled_bytes", r.spilled_bytes},
           {"spilled_total_bytes", r.spilled_total_bytes},
           {"transport", r.transport},
           {"transport_reason", r.transport_reason},
           {"transport_queue_requests", r.transport_queue_requests},
           {"transport_sched_raised", r.transport_sched_raised},
           {"pid", r.pid},
           {"source", r.source},
           {"mountpoint", r.mountpoint}};
}

void from_json(const json& j, StatsReport& r) {
  j.at("page_size").get_to(r.page_size);
  j.at("files_open").get_to(r.files_open);
  j.at("snapshots").get_to(r.snapshots);
  r.snapshots_kept = j.value("snapshots_kept", uint64_t{0});
  j.at("materialized_bytes").get_to(r.materialized_bytes);
  j.at("loaded_bytes").get_to(r.loaded_bytes);
  j.at("dirty_pages").get_to(r.dirty_pages);
  j.at("dirty_bytes").get_to(r.dirty_bytes);
  j.at("skipped_pages").get_to(r.skipped_pages);
  j.at("synced_bytes").get_to(r.synced_bytes);
  j.at("evicted_bytes").get_to(r.evicted_bytes);
  j.at("cache_limit_bytes").get_to(r.cache_limit_bytes);
  j.at("daemon_rss_bytes").get_to(r.daemon_rss_bytes);
  // Not in spec 2.1: tolerated when absent.
  get_optional(j, "dirty_limit_bytes", r.dirty_limit_bytes);
  get_optional(j, "spilled_bytes", r.spilled_bytes);
  get_optional(j, "spilled_total_bytes", r.spilled_total_bytes);
  get_optional(j, "transport", r.transport);
  get_optional(j, "transport_reason", r.transport_reason);
  get_optional(j, "transport_queue_requests", r.transport_queue_requests);
  get_optional(j, "transport_sched_raised", r.transport_sched_raised);
  get_optional(j, "pid", r.pid);
  get_optional(j, "source", r.source);
  get_optional(j, "mountpoint", r.mountpoint);
}

}  // namespace deferfs
