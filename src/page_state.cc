#include "deferfs/page_state.h"

#include <cstdio>
#include <cstdlib>

namespace deferfs {

const char* to_string(PageState s) {
  switch (s) {
    case PageState::Absent: return "Absent";
    case PageState::Hole: return "Hole";
    case PageState::Loading: return "Loading";
    case PageState::LoadingInvalidated: return "LoadingInvalidated";
    case PageState::Clean: return "Clean";
    case PageState::Dirty: return "Dirty";
    case PageState::Writeback: return "Writeback";
    case PageState::Spilled: return "Spilled";
  }
  return "?";
}

bool transition_allowed(PageState from, PageState to) {
  using S = PageState;
  if (from == to) return true;
  switch (from) {
    case S::Absent:
      return to == S::Loading || to == S::Hole || to == S::Dirty || to == S::Clean || to == S::Spilled;
    case S::Hole: return to == S::Dirty || to == S::Absent || to == S::Clean;
    case S::Loading:
      return to == S::Clean || to == S::Hole || to == S::Dirty || to == S::LoadingInvalidated ||
             to == S::Absent || to == S::Spilled;
    case S::LoadingInvalidated: return to == S::Absent;
    case S::Clean: return to == S::Dirty || to == S::Absent || to == S::Hole;
    case S::Dirty: return to == S::Clean || to == S::Writeback || to == S::Absent || to == S::Spilled;
    case S::Spilled: return to == S::Loading || to == S::Dirty || to == S::Absent;
    case S::Writeback: return to == S::Clean || to == S::Dirty || to == S::Absent;
  }
  return false;
}

void check_transition(PageState from, PageState to) {
  if (!transition_allowed(from, to)) {
    std::fprintf(stderr, "deferfs: BUG: page state transition %s -> %s is not allowed\n",
                 to_string(from), to_string(to));
    std::abort();
  }
}

}  // namespace deferfs
