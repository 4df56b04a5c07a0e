// The states of one page of a file's snapshot, and the transitions allowed
// between them (in the manner of wendelin.core's PageState and the state
// diagrams of EdenFS's FileInode). Every transition goes through
// check_transition(), which stays on in release builds.
#pragma once

#include <cstdint>

namespace deferfs {

enum class PageState : uint8_t {
  // No entry in the page map. The page's content is the source's (the
  // snapshot's) when the page lies below the file's cut mark, zeros at or
  // above it (see File: the cut mark is the lowest size the file has had
  // since its snapshot). Nothing is resident.
  Absent = 0,
  // Known to be all zeros and equal to the snapshot (a hole of the source, or
  // a page past the snapshot's end never written). Served from a static zero
  // page; nothing resident.
  Hole,
  // A loader owns the page and is reading it from the source with the file's
  // lock released. Everyone else who needs the page waits on the file's
  // condition variable; nobody else writes the page's bytes.
  Loading,
  // Was Loading when something made the load's result useless (the source
  // changed outside, or a truncate cut the page). The loader discards what it
  // read and leaves the page Absent; waiters retry.
  LoadingInvalidated,
  // Resident in the segment, bytes equal to the snapshot's.
  Clean,
  // Resident in the segment, bytes staged by a write; they differed from the
  // snapshot's when the page was last compared.
  Dirty,
  // Dirty page whose bytes a sync has copied and is writing to the source. A
  // write in the meantime moves it back to Dirty; the sync's completion moves
  // it to Clean only if it is still Writeback.
  Writeback,
  // Staged bytes that were moved out of memory into the file's spill file
  // (dirty_limit, spec 7.2), at the page's own offset. Still staged: reads
  // load it back (Loading, then Dirty), sync commits it from the spill file.
  Spilled,
};

inline constexpr int kPageStateCount = 8;

const char* to_string(PageState s);

// True if the page's bytes live in the segment (Clean, Dirty, Writeback).
constexpr bool is_resident(PageState s) {
  return s == PageState::Clean || s == PageState::Dirty || s == PageState::Writeback;
}
// True if the page holds staged bytes that sync must consider.
constexpr bool is_staged(PageState s) {
  return s == PageState::Dirty || s == PageState::Writeback || s == PageState::Spilled;
}
constexpr bool is_loading(PageState s) {
  return s == PageState::Loading || s == PageState::LoadingInvalidated;
}

// Allowed transitions (from -> to):
//   Absent   -> Loading (a loader takes it), Hole (known zero), Dirty (a write
//               past the cut mark; or restored from a previous daemon), Clean (a
//               write past the cut that equals the snapshot), Spilled (restored
//               from a previous daemon's spill file)
//   Hole     -> Dirty (a write), Absent (truncate/discard/resnapshot), Clean
//   Loading  -> Clean | Hole (load done), Dirty (loaded back from the spill
//               file), LoadingInvalidated, Absent (load failed), Spilled
//               (loading back from the spill file failed: still staged there)
//   LoadingInvalidated -> Absent (loader discards)
//   Clean    -> Dirty (a write that changes bytes), Absent (evict, truncate,
//               resnapshot), Hole
//   Dirty    -> Clean (compared equal to the snapshot again, or discard
//               reloaded), Writeback (sync copied it), Absent (truncate, discard),
//               Spilled (moved to the spill file)
//   Spilled  -> Loading (read back), Dirty (overwritten whole), Absent
//               (truncate, discard, committed)
//   Writeback-> Clean (sync done), Dirty (written during sync, or sync failed),
//               Absent (truncate during sync)
bool transition_allowed(PageState from, PageState to);

// Aborts with a message naming both states if the transition is not allowed:
// a broken state machine must stop the daemon before it serves wrong bytes.
void check_transition(PageState from, PageState to);

}  // namespace deferfs
