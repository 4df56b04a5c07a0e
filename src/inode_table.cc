#include "deferfs/inode_table.h"

#include <fuse_lowlevel.h>
#include <unistd.h>

namespace deferfs {

Inode::~Inode() { close(fd); }

InodeTable::InodeTable(int root_fd) {
  struct stat st;
  if (fstat(root_fd, &st) < 0) st = {};
  root_ = std::make_shared<Inode>(root_fd, st);
  root_->nlookup = 1;
}

Inode& InodeTable::get(uint64_t nodeid) {
  if (nodeid == FUSE_ROOT_ID) return *root_;
  return *reinterpret_cast<Inode*>(nodeid);
}

uint64_t InodeTable::nodeid(const Inode& inode) const {
  if (&inode == root_.get()) return FUSE_ROOT_ID;
  return reinterpret_cast<uint64_t>(&inode);
}

std::shared_ptr<Inode> InodeTable::lookup(int fd, const struct stat& st) {
  std::lock_guard lk(m_);
  if (st.st_dev == root_->dev && st.st_ino == root_->ino) {
    close(fd);
    ++root_->nlookup;
    return root_;
  }
  auto key = std::make_pair(st.st_dev, st.st_ino);
  auto it = inodes_.find(key);
  if (it != inodes_.end()) {
    close(fd);
    ++it->second->nlookup;
    return it->second;
  }
  auto inode = std::make_shared<Inode>(fd, st);
  inode->nlookup = 1;
  inodes_.emplace(key, inode);
  return inode;
}

bool InodeTable::removable(Inode& inode) {
  if (inode.nlookup.load() != 0) return false;
  std::lock_guard fl(inode.m);
  return !inode.file || (inode.file->handles.load() == 0 && !inode.file->has_staged_now());
}

void InodeTable::forget(uint64_t nodeid, uint64_t n) {
  if (nodeid == FUSE_ROOT_ID) return;
  std::shared_ptr<Inode> gone;
  {
    std::lock_guard lk(m_);
    Inode& inode = get(nodeid);
    inode.nlookup -= std::min<uint64_t>(n, inode.nlookup.load());
    if (!removable(inode)) return;
    auto it = inodes_.find({inode.dev, inode.ino});
    if (it != inodes_.end() && it->second.get() == &inode) gone = std::move(it->second), inodes_.erase(it);
  }
  released(std::move(gone));
}

void InodeTable::prune(const Inode& inode) {
  std::shared_ptr<Inode> gone;
  {
    std::lock_guard lk(m_);
    auto it = inodes_.find({inode.dev, inode.ino});
    if (it == inodes_.end() || it->second.get() != &inode || !removable(*it->second)) return;
    gone = std::move(it->second);
    inodes_.erase(it);
  }
  released(std::move(gone));
}

void InodeTable::released(std::shared_ptr<Inode> inode) {
  if (inode && release_hook_) release_hook_(*inode);
}

std::shared_ptr<Inode> InodeTable::find(dev_t dev, ino_t ino) {
  std::lock_guard lk(m_);
  auto it = inodes_.find({dev, ino});
  return it == inodes_.end() ? nullptr : it->second;
}

void InodeTable::named(Inode& inode, const Inode& parent, const std::string& name) {
  std::lock_guard lk(inode.m);
  inode.parent = {parent.dev, parent.ino};
  inode.name = name;
}

std::vector<std::shared_ptr<Inode>> InodeTable::with_files() {
  std::vector<std::shared_ptr<Inode>> out;
  std::lock_guard lk(m_);
  for (auto& [key, inode] : inodes_) {
    std::lock_guard fl(inode->m);
    if (inode->file) out.push_back(inode);
  }
  return out;
}

}  // namespace deferfs
