// Renders an Ollama Modelfile TEMPLATE as Ollama does, with Go's text/template: the data is the
// conversation as Ollama passes it (.Messages with .Role and .Content, the system message among
// them; .System). Reads {"template": "...", "cases": [{"messages": [{"role", "content"}]}]} on
// stdin and prints the rendered texts as a JSON array. Used by tests/ollama.rs.
//
//	go run tests/ollama/render.go < cases.json
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Messages []Message `json:"messages"`
}

type Input struct {
	Template string `json:"template"`
	Cases    []Case `json:"cases"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "input:", err)
		os.Exit(1)
	}
	tmpl, err := template.New("t").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(1)
	}
	out := []string{}
	for _, c := range in.Cases {
		system := ""
		for _, m := range c.Messages {
			if m.Role == "system" {
				system = m.Content
			}
		}
		var b strings.Builder
		data := map[string]any{"Messages": c.Messages, "System": system}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, "render:", err)
			os.Exit(1)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
