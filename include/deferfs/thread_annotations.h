// Clang's thread-safety analysis (-Wthread-safety), written the way LevelDB
// writes its port/thread_annotations.h: each macro expands to the attribute
// under clang and to nothing elsewhere, so gcc builds are unchanged.
//
// The vocabulary used in deferfs:
//   GUARDED_BY(mu)     a member read or written only with mu held
//   PT_GUARDED_BY(mu)  the pointee of a member, likewise
//   REQUIRES(mu)       the caller holds mu (the *_locked functions)
//   REQUIRES_SHARED    the caller holds mu at least shared
//   EXCLUDES(mu)       the caller must not hold mu: the function takes it
//   ACQUIRE/RELEASE    what lock and unlock functions do
//   RETURN_CAPABILITY  an accessor returning a mutex (File::commit_mutex)
//   NO_THREAD_SAFETY_ANALYSIS  opt-out, with a comment saying why
// The annotated lock types are in mutex.h.
#pragma once

#if defined(__clang__)
#define DEFERFS_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define DEFERFS_THREAD_ANNOTATION(x)
#endif

#define CAPABILITY(x) DEFERFS_THREAD_ANNOTATION(capability(x))
#define SCOPED_CAPABILITY DEFERFS_THREAD_ANNOTATION(scoped_lockable)
#define GUARDED_BY(x) DEFERFS_THREAD_ANNOTATION(guarded_by(x))
#define PT_GUARDED_BY(x) DEFERFS_THREAD_ANNOTATION(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) DEFERFS_THREAD_ANNOTATION(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) DEFERFS_THREAD_ANNOTATION(acquired_after(__VA_ARGS__))
#define REQUIRES(...) DEFERFS_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) DEFERFS_THREAD_ANNOTATION(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) DEFERFS_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) DEFERFS_THREAD_ANNOTATION(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) DEFERFS_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) DEFERFS_THREAD_ANNOTATION(release_shared_capability(__VA_ARGS__))
#define RELEASE_GENERIC(...) DEFERFS_THREAD_ANNOTATION(release_generic_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) DEFERFS_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) DEFERFS_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) DEFERFS_THREAD_ANNOTATION(assert_capability(x))
#define RETURN_CAPABILITY(x) DEFERFS_THREAD_ANNOTATION(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS DEFERFS_THREAD_ANNOTATION(no_thread_safety_analysis)
