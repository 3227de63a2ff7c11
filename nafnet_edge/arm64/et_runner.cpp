// The ExecuTorch runner nafnet-edge cross-compiles for ARM64 validation under emulation: the .pte in ExecuTorch's
// own C++ runtime (Module API, XNNPACK delegate, optimized and quantized kernels), as an Android app's JNI layer
// runs it.
//
// Usage: et_runner MODEL.pte. Once the method is loaded it writes one JSON line to stdout: the input and output
// tensors (dtype, shape, bytes) and the CPU features cpuinfo (the CPU detection XNNPACK dispatches its kernels on)
// read. Then, until standard input ends, it reads one input
// tensor (raw bytes, the model's layout) at a time, runs "forward" and writes the output tensor's raw bytes.
// Everything else the runtime prints goes to stderr.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#ifndef NAFNET_NO_CPUINFO
#include "cpuinfo.h"
static_assert(sizeof(struct cpuinfo_arm_isa) == CPUINFO_ISA_BYTES, "cpuinfo.h does not match the runtime's cpuinfo");
#endif

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::from_blob;

namespace {

const char* dtype_name(ScalarType type) {
  switch (type) {
    case ScalarType::Float:
      return "float32";
    case ScalarType::Byte:
      return "uint8";
    default:
      return nullptr;
  }
}

std::string describe(const char* dtype, const std::vector<int32_t>& shape, size_t bytes) {
  std::string out = std::string("{\"dtype\": \"") + dtype + "\", \"shape\": [";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "], \"bytes\": " + std::to_string(bytes) + "}";
}

std::string cpu_features() {
#ifdef NAFNET_NO_CPUINFO
  return "null";
#else
  if (!cpuinfo_initialize()) return "null";
  const struct cpuinfo_arm_isa& isa = cpuinfo_isa;
  std::string out = "{";
  const std::pair<const char*, bool> flags[] = {
      {"neon_dot", isa.dot},   {"i8mm", isa.i8mm},   {"fp16arith", isa.fp16arith}, {"fhm", isa.fhm},
      {"bf16", isa.bf16},      {"sve", isa.sve},     {"sve2", isa.sve2},           {"sme", isa.sme},
      {"sme2", isa.sme2},      {"rdm", isa.rdm},        {"atomics", isa.atomics},
  };
  bool first = true;
  for (const auto& [name, value] : flags) {
    out += std::string(first ? "" : ", ") + "\"" + name + "\": " + (value ? "true" : "false");
    first = false;
  }
  return out + "}";
#endif
}

bool read_exactly(uint8_t* data, size_t bytes, bool* ended) {
  size_t done = 0;
  while (done < bytes) {
    size_t n = fread(data + done, 1, bytes - done, stdin);
    if (n == 0) {
      *ended = done == 0 && feof(stdin);
      return false;
    }
    done += n;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s MODEL.pte\n", argv[0]);
    return 2;
  }
  // The data channel is the original stdout; anything the runtime prints goes to stderr instead.
  FILE* data = fdopen(dup(STDOUT_FILENO), "wb");
  dup2(STDERR_FILENO, STDOUT_FILENO);

  Module module(argv[1]);
  if (module.load_method("forward") != executorch::runtime::Error::Ok) {
    fprintf(stderr, "cannot load method forward of %s\n", argv[1]);
    return 3;
  }
  auto meta = module.method_meta("forward");
  if (!meta.ok() || meta->num_inputs() != 1 || meta->num_outputs() < 1) {
    fprintf(stderr, "forward does not take one tensor\n");
    return 3;
  }
  auto input = meta->input_tensor_meta(0);
  auto output = meta->output_tensor_meta(0);
  if (!input.ok() || !output.ok()) {
    fprintf(stderr, "forward's first input or output is not a tensor\n");
    return 3;
  }
  const char* in_dtype = dtype_name(input->scalar_type());
  const char* out_dtype = dtype_name(output->scalar_type());
  if (in_dtype == nullptr || out_dtype == nullptr) {
    fprintf(stderr, "forward's tensors are neither float32 nor uint8\n");
    return 3;
  }
  std::vector<int32_t> in_shape(input->sizes().begin(), input->sizes().end());
  std::vector<int32_t> out_shape(output->sizes().begin(), output->sizes().end());
  const size_t in_bytes = input->nbytes(), out_bytes = output->nbytes();

  fprintf(data, "{\"input\": %s, \"output\": %s, \"cpu_features\": %s}\n",
          describe(in_dtype, in_shape, in_bytes).c_str(), describe(out_dtype, out_shape, out_bytes).c_str(),
          cpu_features().c_str());
  fflush(data);

  std::vector<uint8_t> buffer(in_bytes);
  std::vector<executorch::aten::SizesType> sizes(in_shape.begin(), in_shape.end());
  for (;;) {
    bool ended = false;
    if (!read_exactly(buffer.data(), in_bytes, &ended)) {
      if (ended) return 0;
      fprintf(stderr, "standard input ended inside a tensor\n");
      return 4;
    }
    auto tensor = from_blob(buffer.data(), sizes, input->scalar_type());
    auto result = module.forward(tensor);
    if (!result.ok()) {
      fprintf(stderr, "forward failed (error %d)\n", static_cast<int>(result.error()));
      return 5;
    }
    const auto& out = result->at(0).toTensor();
    if (out.nbytes() != out_bytes) {
      fprintf(stderr, "forward returned %zu bytes, not %zu\n", out.nbytes(), out_bytes);
      return 5;
    }
    if (fwrite(out.const_data_ptr(), 1, out_bytes, data) != out_bytes || fflush(data) != 0) return 6;
  }
}
