package asynqlimit

import (
	"fmt"
	"io"
	"sync"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// Server is an asynq.Server with a Limiter applied: its config wrapped by
// ServerConfig, its handler wrapped by Middleware and its Redis client
// instrumented with the dequeue gate.
type Server struct {
	srv     *asynq.Server
	limiter *Limiter
	// client is the Redis client of srv. asynq does not close a client that
	// it was given, so the Server closes it.
	client      redis.UniversalClient
	closeClient sync.Once
}

// NewServer returns a Server that runs an asynq server on r with cfg under
// limits. It builds the Redis client from r itself, as asynq.NewServer does,
// adds the dequeue gate to it (see Limiter.InstrumentRedis) unless
// WithoutGate is given, and closes it on Shutdown. When WithRegisterer is
// given and WithInspector is not, it also creates an asynq.Inspector on r for
// the queue size metrics, and closes it on Shutdown. The error is the one New
// returns, or an error for an r whose client is not a redis.UniversalClient.
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
	madeClient := r.MakeRedisClient()
	client, ok := madeClient.(redis.UniversalClient)
	if !ok {
		if c, ok := madeClient.(io.Closer); ok {
			c.Close()
		}
		l.Close() // closes insp too
		return nil, fmt.Errorf("asynqlimit: RedisConnOpt %T made a Redis client of type %T, which is not a redis.UniversalClient; "+
			"asynq.NewServer rejects it too", r, madeClient)
	}
	l.InstrumentRedis(client)
	srv := asynq.NewServerFromRedisClient(client, l.ServerConfig(cfg))
	return &Server{srv: srv, limiter: l, client: client}, nil
}

// Limiter returns the Limiter that the server applies.
func (s *Server) Limiter() *Limiter { return s.limiter }

// Run starts the server with handler wrapped by the middleware, blocks until
// the process receives SIGTERM or SIGINT, then shuts the server down and
// closes the Limiter and the Redis client. See asynq.Server.Run.
func (s *Server) Run(handler asynq.Handler) error {
	defer s.limiter.Close()
	defer s.closeRedis()
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
// Config.ShutdownTimeout, and closes the Limiter and the Redis client. See
// asynq.Server.Shutdown. Like asynq, it does not wait for handlers that
// ignore their context; call Limiter().Drain to wait for them too.
func (s *Server) Shutdown() {
	s.srv.Shutdown()
	_ = s.limiter.Close()
	s.closeRedis()
}

// closeRedis closes the Redis client once. asynq no longer uses it by then,
// because its Shutdown returns after every goroutine that uses the client.
func (s *Server) closeRedis() {
	s.closeClient.Do(func() { _ = s.client.Close() })
}

// Ping checks the connection to Redis. See asynq.Server.Ping.
func (s *Server) Ping() error { return s.srv.Ping() }
