// Registration of the boxed fallback (see fallback.cpp).
#pragma once

namespace dtr {

// Registers the fallback directly for every op with a
// CompositeExplicitAutograd kernel not registered yet (Note [Direct
// registrations]); cheap when no op was added since the last call.
void register_new_ops();

}  // namespace dtr
