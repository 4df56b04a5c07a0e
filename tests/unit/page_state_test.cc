// The page state machine: every pair of states against the table in the
// comment of page_state.h, and check_transition() stopping the process on a
// forbidden transition.
#include "deferfs/page_state.h"

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <utility>

namespace deferfs {
namespace {

using S = PageState;

constexpr S kAll[] = {S::Absent, S::Hole,      S::Loading, S::LoadingInvalidated,
                      S::Clean,  S::Dirty,     S::Writeback, S::Spilled};
static_assert(sizeof(kAll) / sizeof(kAll[0]) == kPageStateCount);

// Copied word for word from the comment above transition_allowed().
const std::set<std::pair<S, S>>& allowed_by_comment() {
  static const std::set<std::pair<S, S>> table = {
      // Absent -> Loading, Hole, Dirty, Clean, Spilled (restored from a previous daemon)
      {S::Absent, S::Loading},
      {S::Absent, S::Hole},
      {S::Absent, S::Dirty},
      {S::Absent, S::Clean},
      {S::Absent, S::Spilled},
      // Hole -> Dirty, Absent, Clean
      {S::Hole, S::Dirty},
      {S::Hole, S::Absent},
      {S::Hole, S::Clean},
      // Loading -> Clean | Hole, Dirty (from the spill file),
      //            LoadingInvalidated, Absent, Spilled (spill read failed)
      {S::Loading, S::Clean},
      {S::Loading, S::Hole},
      {S::Loading, S::Dirty},
      {S::Loading, S::LoadingInvalidated},
      {S::Loading, S::Absent},
      {S::Loading, S::Spilled},
      // LoadingInvalidated -> Absent
      {S::LoadingInvalidated, S::Absent},
      // Clean -> Dirty, Absent, Hole
      {S::Clean, S::Dirty},
      {S::Clean, S::Absent},
      {S::Clean, S::Hole},
      // Dirty -> Clean, Writeback, Absent, Spilled
      {S::Dirty, S::Clean},
      {S::Dirty, S::Writeback},
      {S::Dirty, S::Absent},
      {S::Dirty, S::Spilled},
      // Spilled -> Loading, Dirty, Absent
      {S::Spilled, S::Loading},
      {S::Spilled, S::Dirty},
      {S::Spilled, S::Absent},
      // Writeback -> Clean, Dirty, Absent
      {S::Writeback, S::Clean},
      {S::Writeback, S::Dirty},
      {S::Writeback, S::Absent},
  };
  return table;
}

std::string name(S from, S to) { return std::string(to_string(from)) + "->" + to_string(to); }

TEST(PageState, NamesAreDistinct) {
  std::set<std::string> names;
  for (S s : kAll) names.insert(to_string(s));
  EXPECT_EQ(names.size(), static_cast<size_t>(kPageStateCount));
  EXPECT_STREQ(to_string(S::Absent), "Absent");
  EXPECT_STREQ(to_string(S::LoadingInvalidated), "LoadingInvalidated");
  EXPECT_STREQ(to_string(S::Writeback), "Writeback");
  EXPECT_STREQ(to_string(S::Spilled), "Spilled");
}

TEST(PageState, TableHasTwentyEightTransitions) {
  // 27 allowed moves between different states, 29 forbidden ones (8*7 = 56).
  EXPECT_EQ(allowed_by_comment().size(), 28u);
}

TEST(PageState, EveryAllowedTransitionIsAllowed) {
  for (const auto& [from, to] : allowed_by_comment())
    EXPECT_TRUE(transition_allowed(from, to)) << name(from, to);
}

TEST(PageState, EveryOtherTransitionIsForbidden) {
  int forbidden = 0;
  for (S from : kAll)
    for (S to : kAll) {
      if (from == to || allowed_by_comment().count({from, to})) continue;
      ++forbidden;
      EXPECT_FALSE(transition_allowed(from, to)) << name(from, to);
    }
  EXPECT_EQ(forbidden, 28);  // 8 states: 56 pairs less 28 allowed
}

// Staying in a state is not a transition: PageMap::set_state(p, same) is a
// no-op and must not abort (drop_page of an Absent page relies on it).
TEST(PageState, StayingIsAllowed) {
  for (S s : kAll) EXPECT_TRUE(transition_allowed(s, s)) << to_string(s);
}

// Named spot checks of the rules the rest of the core leans on.
TEST(PageState, KeyRules) {
  // A load never ends in the middle of a sync.
  EXPECT_FALSE(transition_allowed(S::Loading, S::Writeback));
  // An invalidated load can only be thrown away.
  EXPECT_FALSE(transition_allowed(S::LoadingInvalidated, S::Clean));
  EXPECT_FALSE(transition_allowed(S::LoadingInvalidated, S::Loading));
  // Only Dirty pages enter Writeback.
  EXPECT_FALSE(transition_allowed(S::Clean, S::Writeback));
  EXPECT_FALSE(transition_allowed(S::Absent, S::Writeback));
  // Staged bytes are never silently turned into "known zero" or "equal to
  // the snapshot" without being compared.
  EXPECT_FALSE(transition_allowed(S::Dirty, S::Hole));
  EXPECT_FALSE(transition_allowed(S::Writeback, S::Hole));
  EXPECT_FALSE(transition_allowed(S::Spilled, S::Clean));
  EXPECT_FALSE(transition_allowed(S::Spilled, S::Hole));
  // A page being written back is in memory; it cannot be spilled meanwhile.
  EXPECT_FALSE(transition_allowed(S::Writeback, S::Spilled));
  EXPECT_FALSE(transition_allowed(S::Clean, S::Spilled));
  // Resident and hole pages are never loaded again without being dropped.
  EXPECT_FALSE(transition_allowed(S::Clean, S::Loading));
  EXPECT_FALSE(transition_allowed(S::Hole, S::Loading));
  EXPECT_FALSE(transition_allowed(S::Dirty, S::Loading));
}

TEST(PageState, Predicates) {
  for (S s : kAll) {
    EXPECT_EQ(is_resident(s), s == S::Clean || s == S::Dirty || s == S::Writeback) << to_string(s);
    EXPECT_EQ(is_staged(s), s == S::Dirty || s == S::Writeback || s == S::Spilled) << to_string(s);
    EXPECT_EQ(is_loading(s), s == S::Loading || s == S::LoadingInvalidated) << to_string(s);
  }
}

TEST(PageState, CheckTransitionPassesAllowedOnes) {
  for (const auto& [from, to] : allowed_by_comment()) check_transition(from, to);
  for (S s : kAll) check_transition(s, s);
  SUCCEED();
}

class PageStateDeath : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(PageStateDeath, ForbiddenTransitionAborts) {
  EXPECT_DEATH(check_transition(S::Absent, S::Writeback), "Absent -> Writeback is not allowed");
  EXPECT_DEATH(check_transition(S::LoadingInvalidated, S::Clean),
               "LoadingInvalidated -> Clean is not allowed");
  EXPECT_DEATH(check_transition(S::Dirty, S::Hole), "Dirty -> Hole is not allowed");
}

TEST_F(PageStateDeath, EveryForbiddenTransitionAborts) {
  for (S from : kAll)
    for (S to : kAll) {
      if (from == to || allowed_by_comment().count({from, to})) continue;
      const std::string expect =
          std::string(to_string(from)) + " -> " + to_string(to) + " is not allowed";
      EXPECT_DEATH(check_transition(from, to), expect) << name(from, to);
    }
}

}  // namespace
}  // namespace deferfs
