package acumaticatest

import (
	"encoding/json"
	"net/http"
	"time"
)

// FaultSpec is the JSON form of a [Fault] for the control API.
type FaultSpec struct {
	Status      int      `json:"status"`
	Body        string   `json:"body"`
	ContentType string   `json:"content_type"`
	RetryAfter  string   `json:"retry_after"`
	DelayMS     int      `json:"delay_ms"`
	Hang        bool     `json:"hang"`
	Reset       bool     `json:"reset"`
	Process     bool     `json:"process"`
	Redirect    string   `json:"redirect"`
	DropFields  []string `json:"drop_fields"`
	ExpiresIn   *float64 `json:"expires_in"`
	Count       int      `json:"count"`
}

func (f FaultSpec) fault() Fault {
	out := Fault{
		Status: f.Status, Body: f.Body, ContentType: f.ContentType, RetryAfter: f.RetryAfter,
		Delay: time.Duration(f.DelayMS) * time.Millisecond, Hang: f.Hang, Reset: f.Reset,
		Process: f.Process, Redirect: f.Redirect,
	}
	if len(f.DropFields) > 0 || f.ExpiresIn != nil {
		drop, exp := f.DropFields, f.ExpiresIn
		out.Mutate = func(m map[string]any) {
			for _, k := range drop {
				delete(m, k)
			}
			if exp != nil {
				m["expires_in"] = *exp
			}
		}
	}
	return out
}

// ControlHandler serves the stand-in's switches under /_control/:
//
//	GET  /_control/counts                  counters as JSON
//	POST /_control/faults                  [FaultSpec...] queued for token requests
//	POST /_control/faults/clear            drop queued faults
//	POST /_control/revoke-refresh-tokens   end every session
//	POST /_control/users                   {"username","password"}: add or change a password
//	POST /_control/clients                 {"client_id","client_secret"}: add or replace a client
//	POST /_control/access-token-lifetime   {"seconds": n}: expires_in of tokens issued from now on
//	POST /_control/consent-user            {"username"}: who consents at the authorize endpoint ("" denies)
//
// It is unauthenticated: run it on loopback only.
func (s *Server) ControlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_control/counts", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, s.Counts())
	})
	mux.HandleFunc("POST /_control/faults", func(w http.ResponseWriter, r *http.Request) {
		var specs []FaultSpec
		if err := json.NewDecoder(r.Body).Decode(&specs); err != nil {
			http.Error(w, "want a JSON array of faults", 400)
			return
		}
		for _, sp := range specs {
			for range max(sp.Count, 1) {
				s.Inject(sp.fault())
			}
		}
		w.WriteHeader(204)
	})
	mux.HandleFunc("POST /_control/faults/clear", func(w http.ResponseWriter, r *http.Request) {
		s.ClearFaults()
		w.WriteHeader(204)
	})
	mux.HandleFunc("POST /_control/revoke-refresh-tokens", func(w http.ResponseWriter, r *http.Request) {
		s.RevokeRefreshTokens()
		w.WriteHeader(204)
	})
	mux.HandleFunc("POST /_control/users", func(w http.ResponseWriter, r *http.Request) {
		var u struct{ Username, Password string }
		if err := json.NewDecoder(r.Body).Decode(&u); err != nil || u.Username == "" {
			http.Error(w, `want {"username":..., "password":...}`, 400)
			return
		}
		s.AddUser(u.Username, u.Password)
		w.WriteHeader(204)
	})
	mux.HandleFunc("POST /_control/clients", func(w http.ResponseWriter, r *http.Request) {
		var c struct {
			ClientID     string `json:"client_id"`
			ClientSecret string `json:"client_secret"`
		}
		if err := json.NewDecoder(r.Body).Decode(&c); err != nil || c.ClientID == "" {
			http.Error(w, `want {"client_id":..., "client_secret":...}`, 400)
			return
		}
		s.AddClient(c.ClientID, c.ClientSecret)
		w.WriteHeader(204)
	})
	mux.HandleFunc("POST /_control/access-token-lifetime", func(w http.ResponseWriter, r *http.Request) {
		var l struct {
			Seconds int `json:"seconds"`
		}
		if err := json.NewDecoder(r.Body).Decode(&l); err != nil || l.Seconds <= 0 {
			http.Error(w, `want {"seconds": n} with n > 0`, 400)
			return
		}
		s.SetAccessTokenLifetime(time.Duration(l.Seconds) * time.Second)
		w.WriteHeader(204)
	})
	mux.HandleFunc("POST /_control/consent-user", func(w http.ResponseWriter, r *http.Request) {
		var u struct{ Username string }
		if err := json.NewDecoder(r.Body).Decode(&u); err != nil {
			http.Error(w, `want {"username":...}`, 400)
			return
		}
		s.SetConsentUser(u.Username)
		w.WriteHeader(204)
	})
	return mux
}

// FullHandler serves the stand-in and its control API on one port.
func (s *Server) FullHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/_control/", s.ControlHandler())
	mux.Handle("/", s.Handler())
	return mux
}
