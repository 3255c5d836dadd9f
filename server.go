package asynqlimit

import (
	"github.com/hibiken/asynq"
)

// Server is an asynq.Server with a Limiter applied: its config wrapped by
// ServerConfig and its handler wrapped by Middleware.
type Server struct {
	srv     *asynq.Server
	limiter *Limiter
}

// NewServer returns a Server that runs asynq.NewServer(r, cfg) under limits.
// When WithRegisterer is given and WithInspector is not, it also creates an
// asynq.Inspector on r for the queue size metrics, and closes it on Shutdown.
// The error is the one New returns.
func NewServer(r asynq.RedisConnOpt, cfg asynq.Config, limits Limits, opts ...Option) (*Server, error) {
	var o options
	for _, opt := range opts {
		opt.apply(&o)
	}
	var insp *asynq.Inspector
	if o.registerer != nil && o.inspector == nil {
		insp = asynq.NewInspector(r)
		opts = append(opts, optionFunc(func(o *options) {
			o.inspector = insp
			o.ownsInspector = true
		}))
	}

	l, err := New(limits, opts...)
	if err != nil {
		if insp != nil {
			insp.Close()
		}
		return nil, err
	}
	return &Server{srv: asynq.NewServer(r, l.ServerConfig(cfg)), limiter: l}, nil
}

// Limiter returns the Limiter that the server applies.
func (s *Server) Limiter() *Limiter { return s.limiter }

// Run starts the server with handler wrapped by the middleware, blocks until
// the process receives SIGTERM or SIGINT, then shuts the server down. See
// asynq.Server.Run.
func (s *Server) Run(handler asynq.Handler) error {
	defer s.limiter.Close()
	return s.srv.Run(s.limiter.Middleware()(handler))
}

// Start starts the server with handler wrapped by the middleware and returns
// at once. See asynq.Server.Start.
func (s *Server) Start(handler asynq.Handler) error {
	return s.srv.Start(s.limiter.Middleware()(handler))
}

// Stop stops the server from taking new tasks. See asynq.Server.Stop.
func (s *Server) Stop() { s.srv.Stop() }

// Shutdown shuts the server down, waiting for running handlers up to
// Config.ShutdownTimeout, and closes the Limiter. See asynq.Server.Shutdown.
// Like asynq, it does not wait for handlers that ignore their context; call
// Limiter().Drain to wait for them too.
func (s *Server) Shutdown() {
	s.srv.Shutdown()
	_ = s.limiter.Close()
}

// Ping checks the connection to Redis. See asynq.Server.Ping.
func (s *Server) Ping() error { return s.srv.Ping() }
