// Entry point ONNX Runtime calls when the library is registered
// (SessionOptions.register_custom_ops_library): adds CGConv, PGConv, FBSConv, SparseInputConv,
// QuantizeActivation and StreamConv to the `gate2deploy` domain for the CPU execution provider.
//
// Built against the ONNX Runtime 1.21 headers (ORT_API_VERSION 21); the C API is versioned
// and backward compatible, so the library loads into newer runtimes (1.31 tested).
#include <memory>
#include <mutex>

#include "cg_conv.h"
#include "fbs_conv.h"
#include "pg_conv.h"
#include "quantize_activation.h"
#include "sparse_input_conv.h"
#include "stream_conv.h"

namespace {
// The op objects must outlive every session that uses them: keep them for the process.
struct Registry {
  std::unique_ptr<Ort::Custom::OrtLiteCustomOp> cg{
      Ort::Custom::CreateLiteCustomOp<g2d::CGConvKernel>("CGConv", "CPUExecutionProvider")};
  std::unique_ptr<Ort::Custom::OrtLiteCustomOp> pg{
      Ort::Custom::CreateLiteCustomOp<g2d::PGConvKernel>("PGConv", "CPUExecutionProvider")};
  std::unique_ptr<Ort::Custom::OrtLiteCustomOp> fbs{
      Ort::Custom::CreateLiteCustomOp<g2d::FBSConvKernel>("FBSConv", "CPUExecutionProvider")};
  std::unique_ptr<Ort::Custom::OrtLiteCustomOp> sparse_input{
      Ort::Custom::CreateLiteCustomOp<g2d::SparseInputConvKernel>("SparseInputConv",
                                                                  "CPUExecutionProvider")};
  std::unique_ptr<Ort::Custom::OrtLiteCustomOp> quantize{
      Ort::Custom::CreateLiteCustomOp<g2d::QuantizeActivationKernel>("QuantizeActivation",
                                                                     "CPUExecutionProvider")};
  std::unique_ptr<Ort::Custom::OrtLiteCustomOp> stream{
      Ort::Custom::CreateLiteCustomOp<g2d::StreamConvKernel>("StreamConv", "CPUExecutionProvider")};
  Ort::CustomOpDomain domain{"gate2deploy"};
  Registry() {
    domain.Add(cg.get());
    domain.Add(pg.get());
    domain.Add(fbs.get());
    domain.Add(sparse_input.get());
    domain.Add(quantize.get());
    domain.Add(stream.get());
  }
};
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    static Registry registry;
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(registry.domain);
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  }
}
