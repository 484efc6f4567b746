"""Where local models run: in this process (the default), or as Ray Serve deployments on a Ray
cluster (`backend: ray` in the fleet file; the `shoal[ray]` extra). Ray is imported only by the
modules here that use it, and only when a fleet asks for it."""
