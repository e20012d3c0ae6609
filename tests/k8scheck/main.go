// k8scheck decodes Kubernetes manifests into the API's own Go types, strictly: a field
// the type does not have (a misspelling, a field at the wrong level) or a value of the
// wrong type is an error, as `kubectl apply --validate=strict` would report it against a
// cluster. No cluster is needed.
//
// Usage: k8scheck FILE...   (multi-document YAML; prints one line per object)
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"
)

type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// named is what every checked kind has: a name in its ObjectMeta.
type named interface{ GetName() string }

func newObject(apiVersion, kind string) (named, error) {
	switch apiVersion + " " + kind {
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "v1 Secret":
		return &corev1.Secret{}, nil
	case "v1 Service":
		return &corev1.Service{}, nil
	case "v1 ServiceAccount":
		return &corev1.ServiceAccount{}, nil
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, nil
	case "apps/v1 StatefulSet":
		return &appsv1.StatefulSet{}, nil
	case "networking.k8s.io/v1 NetworkPolicy":
		return &networkingv1.NetworkPolicy{}, nil
	}
	return nil, fmt.Errorf("unknown apiVersion/kind %q %q", apiVersion, kind)
}

// documents splits multi-document YAML on lines that are exactly "---".
func documents(data []byte) [][]byte {
	var docs [][]byte
	var current bytes.Buffer
	scanner := bufio.NewScanner(bytes.NewReader(data))
	scanner.Buffer(make([]byte, 1<<20), 1<<24)
	for scanner.Scan() {
		line := scanner.Text()
		if strings.TrimRight(line, " \t") == "---" {
			docs = append(docs, append([]byte(nil), current.Bytes()...))
			current.Reset()
			continue
		}
		current.WriteString(line)
		current.WriteByte('\n')
	}
	return append(docs, current.Bytes())
}

func check(path string) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	count := 0
	for index, doc := range documents(data) {
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		var meta typeMeta
		if err := yaml.Unmarshal(doc, &meta); err != nil {
			return count, fmt.Errorf("%s: document %d: %v", path, index+1, err)
		}
		object, err := newObject(meta.APIVersion, meta.Kind)
		if err != nil {
			return count, fmt.Errorf("%s: document %d: %v", path, index+1, err)
		}
		if err := yaml.UnmarshalStrict(doc, object); err != nil {
			return count, fmt.Errorf("%s: document %d (%s): %v", path, index+1, meta.Kind, err)
		}
		if object.GetName() == "" {
			return count, fmt.Errorf("%s: document %d (%s): no metadata.name", path, index+1, meta.Kind)
		}
		fmt.Printf("ok %s %s/%s\n", path, meta.Kind, object.GetName())
		count++
	}
	return count, nil
}

func stripComments(doc []byte) []byte {
	var out bytes.Buffer
	for _, line := range strings.Split(string(doc), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		out.WriteString(line)
		out.WriteByte('\n')
	}
	return out.Bytes()
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: k8scheck FILE...")
		os.Exit(2)
	}
	failed := false
	for _, path := range os.Args[1:] {
		if count, err := check(path); err != nil {
			fmt.Fprintln(os.Stderr, "k8scheck:", err)
			failed = true
		} else if count == 0 {
			fmt.Fprintf(os.Stderr, "k8scheck: %s: no objects\n", path)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}
