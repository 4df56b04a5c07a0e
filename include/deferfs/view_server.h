// The daemon's side of views (spec 9, protocol in view_wire.h): one thread
// per view answers the view's requests and serves the faults of its
// mapping, loading pages through the File's loader (File::load_for_view).
//
// Ownership: a view owns its connection, the client's userfaultfd and a
// ViewTarget (a reference on the File and what to do when the view ends).
// The ViewServer owns the views' threads; its destructor stops and joins
// them. A client that dies mid-fault only ends its own view: the thread
// sees the connection close; the other views never wait for it.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace deferfs {

class File;

struct ViewTarget {
  std::shared_ptr<File> file;
  std::string name;                  // for log lines
  std::function<void()> after_load;  // after each served fault (cache balance)
  std::function<void()> release;     // once, when the view ends
};

class ViewServer {
 public:
  static constexpr size_t kMaxViews = 1024;

  ViewServer();
  ~ViewServer();  // ends every view (their release runs) and joins
  ViewServer(const ViewServer&) = delete;
  ViewServer& operator=(const ViewServer&) = delete;

  // Takes over `conn` (a control connection whose view request was
  // accepted) and serves the view in a thread of its own. On failure (too
  // many views, no thread) runs the target's release and throws
  // std::system_error; `conn` stays the caller's.
  void start(int conn, ViewTarget target);

 private:
  struct View;
  void reap(bool all);

  int stop_pipe_[2] = {-1, -1};  // a byte in it (never read) means "stop"
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;                        // guards views_
  std::list<std::unique_ptr<View>> views_;  // running or finished, reaped by start()
};

}  // namespace deferfs
