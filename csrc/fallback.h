// Registration of the boxed fallback (see fallback.cpp).
#pragma once

namespace dtr {

// Registers the fallback directly for every op not registered yet that
// needs_direct_registration (Note [Direct registrations]); cheap when no op
// was added since the last call.
void register_new_ops();

}  // namespace dtr
