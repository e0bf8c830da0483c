// Note [The device's count in C++]
// The budget bounds the device's tensor memory as its allocator counts it
// (Note [The budget is the device's memory] in docs/design.md). On CPU that is
// the counting allocator (alloc_meter.h). On CUDA, and on any device whose
// allocator is a c10::DeviceAllocator, it is that allocator's own count of
// allocated bytes, block rounding included: what torch.cuda.memory_allocated
// returns, with no model of the caching allocator. It is reached through
// c10's device-generic interface, so the extension needs no CUDA headers and
// builds against the CPU wheel. It reads the allocator's statistics under the
// allocator's own lock and never synchronizes the device.
#pragma once

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Device.h>

namespace dtr {

class DeviceMeter {
 public:
  // Throws (TORCH_CHECK) when the device's allocator keeps no count.
  explicit DeviceMeter(c10::Device device);
  int64_t allocated_bytes() const;
  c10::Device device() const { return device_; }

 private:
  c10::Device device_;
  c10::DeviceAllocator* allocator_;
};

}  // namespace dtr
