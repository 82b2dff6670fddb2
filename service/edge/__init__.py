"""The HTTP edge: handler routes, direct dispatch, whole answers, connection rules, handler auth."""
