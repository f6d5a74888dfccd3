NAMESPACE = "flashsale"  # the Ray namespace of the engine's named actors
