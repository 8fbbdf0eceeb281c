// Renders Go text/template cases as Ollama does for a chat: the template gets .System (every system
// message, joined) and .Messages (every message, system ones included, each with .Role and .Content).
// Input on stdin: [{"Template": "...", "System": "...", "Messages": [{"Role": "user", "Content": "..."}]}, ...]
// Output on stdout: a JSON list of the rendered strings. Used by tests/test_export_gguf.py.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Template string
	System   string
	Messages []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	rendered := []string{}
	for _, c := range cases {
		tmpl := template.Must(template.New("").Parse(c.Template))
		var out bytesBuffer
		if err := tmpl.Execute(&out, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil {
			panic(err)
		}
		rendered = append(rendered, string(out))
	}
	if err := json.NewEncoder(os.Stdout).Encode(rendered); err != nil {
		panic(err)
	}
}

type bytesBuffer []byte

func (b *bytesBuffer) Write(p []byte) (int, error) {
	*b = append(*b, p...)
	return len(p), nil
}
