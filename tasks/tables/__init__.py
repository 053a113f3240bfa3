"""Tables as users bring them: per-column statistics at staging, features and labels encoded from them."""
