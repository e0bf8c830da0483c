// Note [Unboxed kernels]
// The boxed fallback costs every op two things eager does not pay:
//  - Boxing copies each tensor argument onto a Stack. A wrapper held only by
//    its Python object has a refcount of one, and torch 2.13's PyObject
//    preservation (intrusive_ptr.h, Note [PyObject preservation for Tensor and
//    Storages]) increfs the PyObject when a refcount goes from one to two and
//    decrefs it on the way back, each under the GIL, which THPVariable_add and
//    its kind have released: two GIL hand-offs per op (callgrind: about a
//    tenth of what the C++ runtime added per op to a chain of adds).
//  - A heap-allocated Stack and the boxed calling convention, even for an op
//    on plain tensors that dtr passes through untouched (Linear's weight.t()).
// For the signatures below, which cover most ops of the bench models, the op
// gets an unboxed kernel on kDTRKey instead. It reads its tensor and
// tensor-list arguments through the caller's references: an op that involves
// no dtr tensor and makes none is called unboxed below dtr with the arguments
// as they came, and an op for the runtime gets a Stack whose tensor slots are
// empty, with the tensors beside it (Runtime::dispatch's `held`), so no
// wrapper's refcount ever moves. (A list that reaches cat already boxed, from
// a boxed caller, goes on the Stack as it is: its elements are owned by it.) Everything else (which runtime, what to hook, what the runtime
// does) is the boxed fallback's, so the two paths differ only in how the
// arguments arrive.
//
// An op gets one only where a kernel on kDTRKey changes nothing else: a
// functional aten op with one tensor result or one list of them (in-place,
// out=, metadata-changing, collective and tuple-result ops keep the boxed
// path), either already
// registered directly (Note [Direct registrations]) or without a
// CompositeImplicitAutograd kernel (with one and no direct registration it
// must keep decomposing above autograd). Its C++ signature is checked against
// the dispatcher's (typed<>) and its schema's types, real SymInt types included.
#include "unboxed_kernels.h"

#include <ATen/core/op_registration/infer_schema.h>
#include <ATen/ops/_softmax_backward_data_ops.h>
#include <ATen/ops/_softmax_ops.h>
#include <ATen/ops/add_ops.h>
#include <ATen/ops/addmm_ops.h>
#include <ATen/ops/cat_ops.h>
#include <ATen/ops/clone_ops.h>
#include <ATen/ops/expand_ops.h>
#include <ATen/ops/mul_ops.h>
#include <ATen/ops/permute_ops.h>
#include <ATen/ops/select_ops.h>
#include <ATen/ops/slice_ops.h>
#include <ATen/ops/split_ops.h>
#include <ATen/ops/split_with_sizes_ops.h>
#include <ATen/ops/stack_ops.h>
#include <ATen/ops/sum_ops.h>
#include <ATen/ops/t_ops.h>
#include <ATen/ops/transpose_ops.h>
#include <ATen/ops/unbind_ops.h>
#include <ATen/ops/unsqueeze_ops.h>
#include <ATen/ops/view_ops.h>
#include <c10/core/GradMode.h>

#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "capture.h"
#include "direct_registrations.h"
#include "errors.h"
#include "fallback.h"
#include "op_traits.h"
#include "runtime.h"
#include "thread_state.h"
#include "wrapper.h"

namespace dtr {
namespace {

template <class A>
constexpr bool is_tensor_arg = std::is_same_v<std::decay_t<A>, at::Tensor>;
// stack's TensorList and cat's ITensorListRef.
template <class A>
constexpr bool is_tensor_list_arg = std::is_same_v<std::decay_t<A>, at::TensorList> ||
                                    std::is_same_v<std::decay_t<A>, at::ITensorListRef>;

// The tensors of a list argument as the caller holds them, if it holds them
// as an array (an ITensorListRef from a boxed caller wraps a c10::List).
inline std::optional<at::TensorList> held_list(at::TensorList list) { return list; }
inline std::optional<at::TensorList> held_list(const at::ITensorListRef& list) {
  if (list.isUnboxed()) return list.toUnboxed();
  return std::nullopt;
}

// A Stack for one op, kept by the thread (thread_state.h) with its capacity
// for the next op (a heap block per op otherwise). One per nesting level: a
// Python policy called while an op makes room may run ops of its own. The
// thread keeps them by pointer: moving a Stack in and out of the spare list
// cost two calls a op to libtorch's out-of-line vector destructor.
struct BorrowedStack {
  ThreadState& thread = thread_state();  // before `owned`, which is taken from it
  std::unique_ptr<torch::jit::Stack> owned;
  torch::jit::Stack& stack;
  BorrowedStack() : owned(take(thread)), stack(*owned) {}
  ~BorrowedStack() {
    stack.clear();
    if (!thread.exited) thread.spare_stacks.push_back(std::move(owned));
  }
  static std::unique_ptr<torch::jit::Stack> take(ThreadState& thread) {
    if (thread.exited || thread.spare_stacks.empty()) return std::make_unique<torch::jit::Stack>();
    std::unique_ptr<torch::jit::Stack> s = std::move(thread.spare_stacks.back());
    thread.spare_stacks.pop_back();
    return s;
  }
  BorrowedStack(const BorrowedStack&) = delete;
  BorrowedStack& operator=(const BorrowedStack&) = delete;
};

template <class Sig>
class UnboxedFallback;

template <class Return, class... Args>
class UnboxedFallback<Return(Args...)> final : public c10::OperatorKernel {
 public:
  using Signature = Return(Args...);
  static_assert(std::is_same_v<Return, at::Tensor> || std::is_same_v<Return, std::vector<at::Tensor>>);

  UnboxedFallback(const c10::OperatorHandle& op, const OpTraits& traits)
      : op_(op), typed_(op.typed<Signature>()), traits_(traits) {}

  Return operator()(Args... args) {
    return with_python_errors([&]() -> Return {
      Runtime* owner = nullptr;
      (note_owner(owner, args), ...);
      Runtime* active = active_runtime();
      Runtime* rt = runtime_taking_op(owner, active, traits_);
      if (rt == nullptr) {
        if (active != nullptr && c10::GradMode::is_enabled()) (hook_if_plain_leaf(args), ...);
        if (active != nullptr && active->allocates_plain(traits_)) {
          // Note [Room for plain ops] (plain_ops.cpp), through the boxed path.
          torch::jit::Stack stack = c10::impl::boxArgs<Args...>(args...);
          active->run_plain(op_, traits_, &stack);
          return result_of(stack);
        }
        BelowDTRGuard below;
        return typed_.call(args...);
      }
      BorrowedStack borrowed;
      torch::jit::Stack& stack = borrowed.stack;
      stack.reserve(sizeof...(Args));
      std::array<HeldArgument, sizeof...(Args)> held{};
      size_t i = 0;
      (push(stack, held, i++, args), ...);
      if constexpr (kRunsUnboxed) {
        auto run_unboxed = [&](torch::jit::Stack* s) {
          call_on_values(*s, std::index_sequence_for<Args...>{}, args...);
        };
        const KernelRun run(run_unboxed);
        rt->dispatch(op_, traits_, &stack, held, &run);
      } else {
        rt->dispatch(op_, traits_, &stack, held);
      }
      return result_of(stack);
    });
  }

 private:
  // The op's one result, left on the stack by the runtime.
  Return result_of(torch::jit::Stack& stack) const {
    TORCH_INTERNAL_ASSERT(stack.size() == 1, "dtr: ", traits_.name, " left ", stack.size(),
                          " results");
    if constexpr (std::is_same_v<Return, at::Tensor>) {
      return std::move(stack[0]).toTensor();
    } else {
      return std::move(stack[0]).toTensorVector();
    }
  }

  // Note [Unboxed kernel runs]
  // The runtime runs the op's kernel on the values of its inputs. Through
  // op.callBoxed, the kernel's boxed wrapper converts every argument back from
  // its IValue (a view's sizes into a new vector of SymInts) and its result
  // into one. An unboxed kernel instead passes the runtime a KernelRun that
  // calls the op's typed handle, below dtr as callBoxed would run: the tensors
  // are the values the runtime put on the stack (it may put them there again,
  // on a retry after running out of memory), every other argument is the
  // caller's own. Signatures with a tensor list keep callBoxed: a list's values
  // are a c10::List on the stack, which would need a copy to become an ArrayRef.
  static constexpr bool kRunsUnboxed = !(is_tensor_list_arg<Args> || ...);

  template <size_t... I>
  void call_on_values(torch::jit::Stack& s, std::index_sequence<I...>, Args... args) {
    const size_t first = s.size() - sizeof...(Args);
    Return out = typed_.call(value_or_own<Args>(s[first + I], args)...);
    // Popped one by one: torch::jit::drop's erase is libtorch's out-of-line copy.
    for (size_t k = 0; k < sizeof...(Args); ++k) s.pop_back();
    s.emplace_back(std::move(out));
  }

  template <class A>
  static decltype(auto) value_or_own(const c10::IValue& slot, const A& own) {
    if constexpr (is_tensor_arg<A>) {
      return slot.toTensor();
    } else {
      return (own);
    }
  }

  // The runtime of the first dtr tensor among the arguments, as the fallback's.
  template <class A>
  static void note_owner(Runtime*& owner, const A& a) {
    if (owner != nullptr) return;
    if constexpr (is_tensor_arg<A>) {
      owner = runtime_of(a);
    } else if constexpr (is_tensor_list_arg<A>) {
      for (const at::Tensor& t : a) {
        if ((owner = runtime_of(t)) != nullptr) return;
      }
    }
  }

  template <class A>
  static void hook_if_plain_leaf(const A& a) {
    if constexpr (is_tensor_arg<A>) {
      hook_plain_leaf(a);
    } else if constexpr (is_tensor_list_arg<A>) {
      for (const at::Tensor& t : a) hook_plain_leaf(t);
    }
  }

  // As the dispatcher boxes an argument, but tensors stay with the caller.
  template <class A>
  static void push(torch::jit::Stack& stack, std::array<HeldArgument, sizeof...(Args)>& held,
                   size_t i, const A& a) {
    if constexpr (is_tensor_arg<A>) {
      held[i].tensor = &a;
      stack.emplace_back();
    } else if constexpr (is_tensor_list_arg<A>) {
      held[i].list = held_list(a);
      if (held[i].list) {
        stack.emplace_back();
      } else {
        stack.emplace_back(a);
      }
    } else {
      stack.emplace_back(a);
    }
  }

  c10::OperatorHandle op_;
  c10::TypedOperatorHandle<Signature> typed_;
  const OpTraits& traits_;  // op_traits' cache lives as long as the process
};

// Whether `op`'s schema has exactly the types Sig's arguments and result infer.
template <class Sig>
bool schema_matches(const c10::FunctionSchema& schema) {
  static const c10::FunctionSchema inferred = c10::inferFunctionSchemaFlattenedReturns<Sig>();
  const auto& want = inferred.arguments();
  const auto& have = schema.arguments();
  if (want.size() != have.size() || schema.returns().size() != 1) return false;
  if (*schema.returns()[0].type() != *inferred.returns()[0].type()) return false;
  for (size_t i = 0; i < want.size(); ++i) {
    if (*want[i].type() != *have[i].type() || *want[i].real_type() != *have[i].real_type()) {
      return false;
    }
  }
  return true;
}

// Whether the dispatcher knows `op` with Sig as its C++ signature (typed<>
// checks it against the op's kernels).
template <class Sig>
bool signature_fits(const c10::OperatorHandle& op) {
  if (!schema_matches<Sig>(op.schema())) return false;
  try {
    (void)op.typed<Sig>();
  } catch (const c10::Error&) {
    return false;
  }
  return true;
}

template <class Sig>
c10::RegistrationHandleRAII register_as(const c10::OperatorHandle& op, const OpTraits& traits) {
  return c10::Dispatcher::singleton().registerImpl(
      op.operator_name(), kDTRKey,
      c10::KernelFunction::makeFromUnboxedFunctor<false, UnboxedFallback<Sig>>(
          std::make_unique<UnboxedFallback<Sig>>(op, traits)),
      c10::impl::CppSignature::make<Sig>(),
      std::make_unique<c10::FunctionSchema>(c10::inferFunctionSchemaFlattenedReturns<Sig>()),
      "dtr unboxed kernel");
}

using Registrar = c10::RegistrationHandleRAII (*)(const c10::OperatorHandle&, const OpTraits&);

template <class... Sigs>
Registrar registrar_for(const c10::OperatorHandle& op) {
  Registrar found = nullptr;
  ((found == nullptr && signature_fits<Sigs>(op) ? (found = &register_as<Sigs>) : found), ...);
  return found;
}

}  // namespace

std::optional<c10::RegistrationHandleRAII> register_unboxed_kernel(const c10::OperatorHandle& op) {
  if (op.operator_name().name.rfind("aten::", 0) != 0) return std::nullopt;
  if (op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd) &&
      !needs_direct_registration(op)) {
    return std::nullopt;
  }
  // Signatures of the commonest ops (each line: some of the ops that have it).
  const Registrar registrar = registrar_for<
      at::_ops::t::schema,                        // t, detach, sigmoid, tanh, relu, neg, exp
      at::_ops::mul_Tensor::schema,               // mul, div, mm, bmm, sigmoid_backward
      at::_ops::add_Tensor::schema,               // add, sub, threshold_backward
      at::_ops::mul_Scalar::schema,               // mul.Scalar, div.Scalar, pow.Tensor_Scalar
      at::_ops::addmm::schema,                    // addmm, baddbmm
      at::_ops::view::schema,                     // view, _unsafe_view, _reshape_alias
      at::_ops::expand::schema,                   // expand
      at::_ops::unsqueeze::schema,                // unsqueeze, squeeze.dim
      at::_ops::transpose_int::schema,            // transpose
      at::_ops::select_int::schema,               // select
      at::_ops::slice_Tensor::schema,             // slice
      at::_ops::permute::schema,                  // permute
      at::_ops::sum_dim_IntList::schema,          // sum.dim_IntList, mean.dim
      at::_ops::_softmax::schema,                 // _softmax, _log_softmax
      at::_ops::_softmax_backward_data::schema,   // their backwards
      at::_ops::clone::schema,                    // clone
      at::_ops::cat::schema,                      // cat
      at::_ops::stack::schema,                    // stack
      at::_ops::split_Tensor::schema,             // split (chunk's), unsafe_split
      at::_ops::split_with_sizes::schema,         // split_with_sizes
      at::_ops::unbind_int::schema>(op);          // unbind
  if (registrar == nullptr) return std::nullopt;
  const OpTraits& traits = op_traits(op);
  if (!traits.written.empty() || traits.unsupported || traits.collective || traits.run_as ||
      !traits.returns_tensor) {
    return std::nullopt;
  }
  return registrar(op, traits);
}

}  // namespace dtr
