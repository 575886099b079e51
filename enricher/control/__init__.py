"""The control plane: models, toggles and statuses (plane), where a remote
caller may point data (locations), and the trigger that turns toggles into
training workflows (trigger)."""
