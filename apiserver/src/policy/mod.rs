//! Who is asking and what they may do: authentication, roles, the node authorizer.

pub mod identity;
