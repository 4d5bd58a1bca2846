// Command k8s-validate checks rendered Kubernetes manifests against the API's Go types.
//
// Every YAML document (from the files named, or stdin) is decoded strictly into the
// k8s.io/api type its apiVersion and kind name: a field the type does not have, a value
// of the wrong type, a duplicate key, or a kind the API does not know is an error. Then a
// few rules the API server would enforce, or a chart most often gets wrong, are checked:
// names and labels are valid, a workload's selector matches its pod template, a Service's
// or PodDisruptionBudget's selector matches some rendered pod template, every volume mount
// names a volume, and a probe's named port is a port of its container.
//
// It exits 1 with one line per problem, 0 with one line per object.
//
// With -to-json it only reads: it prints the documents as one JSON array (merge keys
// applied, as docker compose does), for tests that check YAML files that are not
// Kubernetes objects (deploy/compose.yaml) without a YAML library of their own.
package main

import (
	"bufio"
	"bytes"
	encjson "encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"
)

// object is one decoded document and where it came from.
type object struct {
	where string
	obj   runtime.Object
	meta  metav1.Object
	kind  string
}

func (o object) String() string {
	return fmt.Sprintf("%s %s %q", o.where, o.kind, o.meta.GetName())
}

// podTemplate is a pod template of a workload, to match selectors against.
type podTemplate struct {
	owner object
	spec  *corev1.PodTemplateSpec
}

func main() {
	toJSON := flag.Bool("to-json", false, "print the documents as a JSON array instead of checking them")
	flag.Parse()
	paths := flag.Args()
	if len(paths) == 0 {
		paths = []string{"-"}
	}
	if *toJSON {
		if err := printJSON(paths); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	var objects []object
	var problems []string
	for _, path := range paths {
		found, errs := readFile(path)
		objects = append(objects, found...)
		problems = append(problems, errs...)
	}
	problems = append(problems, check(objects)...)
	if len(objects) == 0 && len(problems) == 0 {
		problems = append(problems, "no Kubernetes objects in the input")
	}
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, p)
	}
	if len(problems) > 0 {
		fmt.Fprintf(os.Stderr, "%d problem(s) in %d object(s)\n", len(problems), len(objects))
		os.Exit(1)
	}
	for _, o := range objects {
		fmt.Println("ok", o)
	}
}

// documents reads the YAML documents of path ("-": stdin), skipping blank ones.
func documents(path string, each func(where string, data []byte) error) error {
	var in io.Reader = os.Stdin
	name := "stdin"
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		in, name = f, path
	}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(in))
	for doc := 1; ; doc++ {
		data, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return nil
		}
		where := fmt.Sprintf("%s: document %d", name, doc)
		if err != nil {
			return fmt.Errorf("%s: %w", where, err)
		}
		if blank(data) {
			continue
		}
		if source := sourceComment(data); source != "" {
			where = fmt.Sprintf("%s (%s)", where, source)
		}
		if err := each(where, data); err != nil {
			return err
		}
	}
}

func printJSON(paths []string) error {
	var docs []encjson.RawMessage
	for _, path := range paths {
		err := documents(path, func(where string, data []byte) error {
			// Not strict: a key beside a merge key (`<<: *base`) overrides the merged one.
			asJSON, err := yaml.YAMLToJSON(data)
			if err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
			docs = append(docs, asJSON)
			return nil
		})
		if err != nil {
			return err
		}
	}
	out, err := encjson.Marshal(docs)
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(out))
	return err
}

func readFile(path string) ([]object, []string) {
	decoder := json.NewSerializerWithOptions(
		json.DefaultMetaFactory, scheme.Scheme, scheme.Scheme, json.SerializerOptions{Strict: true},
	)
	var objects []object
	var problems []string
	err := documents(path, func(where string, data []byte) error {
		asJSON, err := yaml.YAMLToJSONStrict(data)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", where, err))
			return nil
		}
		obj, gvk, err := decoder.Decode(asJSON, nil, nil)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", where, err))
			return nil
		}
		meta, ok := obj.(metav1.Object)
		if !ok {
			problems = append(problems, fmt.Sprintf("%s: %s has no object metadata", where, gvk.Kind))
			return nil
		}
		kind := gvk.GroupVersion().String() + " " + gvk.Kind
		objects = append(objects, object{where: where, obj: obj, meta: meta, kind: kind})
		return nil
	})
	if err != nil {
		problems = append(problems, err.Error())
	}
	return objects, problems
}

// blank says whether a document holds nothing but comments and whitespace (helm renders
// a template that came out empty that way).
func blank(data []byte) bool {
	for _, line := range bytes.Split(data, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) > 0 && line[0] != '#' && string(line) != "---" {
			return false
		}
	}
	return true
}

// sourceComment is the template a document came from (`# Source: chart/templates/x.yaml`).
func sourceComment(data []byte) string {
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "# Source: "); ok {
			return rest
		}
	}
	return ""
}

func check(objects []object) []string {
	var problems []string
	fail := func(o object, format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s: %s", o, fmt.Sprintf(format, args...)))
	}
	var templates []podTemplate
	seen := map[string]object{}
	for _, o := range objects {
		key := o.kind + "/" + o.meta.GetNamespace() + "/" + o.meta.GetName()
		if first, dup := seen[key]; dup {
			fail(o, "the same object as %s", first.where)
		}
		seen[key] = o
		nameErrs := validation.IsDNS1123Subdomain(o.meta.GetName())
		if _, ok := o.obj.(*corev1.Service); ok {
			nameErrs = validation.IsDNS1035Label(o.meta.GetName())
		}
		for _, e := range nameErrs {
			fail(o, "metadata.name: %s", e)
		}
		problems = append(problems, labelProblems(o, "metadata.labels", o.meta.GetLabels())...)

		// A workload's selector (a Job makes its own) and pod template.
		var selector *metav1.LabelSelector
		var template *corev1.PodTemplateSpec
		selects := true
		switch w := o.obj.(type) {
		case *appsv1.Deployment:
			selector, template = w.Spec.Selector, &w.Spec.Template
		case *appsv1.StatefulSet:
			selector, template = w.Spec.Selector, &w.Spec.Template
		case *appsv1.DaemonSet:
			selector, template = w.Spec.Selector, &w.Spec.Template
		case *batchv1.Job:
			template, selects = &w.Spec.Template, false
		case *batchv1.CronJob:
			template, selects = &w.Spec.JobTemplate.Spec.Template, false
		}
		if template == nil {
			continue
		}
		templates = append(templates, podTemplate{owner: o, spec: template})
		problems = append(problems, labelProblems(o, "spec.template.metadata.labels", template.Labels)...)
		problems = append(problems, podProblems(o, &template.Spec)...)
		if !selects {
			continue
		}
		if selector == nil {
			fail(o, "spec.selector is required")
			continue
		}
		s, err := metav1.LabelSelectorAsSelector(selector)
		switch {
		case err != nil:
			fail(o, "spec.selector: %v", err)
		case s.Empty():
			fail(o, "spec.selector is empty: it would select every pod")
		case !s.Matches(labels.Set(template.Labels)):
			fail(o, "spec.selector %s does not match the pod template's labels %v", s, template.Labels)
		}
	}
	for _, o := range objects {
		var s labels.Selector
		switch x := o.obj.(type) {
		case *corev1.Service:
			if len(x.Spec.Selector) == 0 {
				continue // endpoints managed elsewhere
			}
			s = labels.SelectorFromSet(x.Spec.Selector)
			problems = append(problems, servicePortProblems(o, x, templates)...)
		case *policyv1.PodDisruptionBudget:
			if x.Spec.Selector == nil {
				fail(o, "spec.selector is required")
				continue
			}
			var err error
			if s, err = metav1.LabelSelectorAsSelector(x.Spec.Selector); err != nil {
				fail(o, "spec.selector: %v", err)
				continue
			}
			if (x.Spec.MinAvailable == nil) == (x.Spec.MaxUnavailable == nil) {
				fail(o, "set exactly one of spec.minAvailable and spec.maxUnavailable")
			}
		default:
			continue
		}
		if len(selected(s, o.meta.GetNamespace(), templates)) == 0 {
			fail(o, "the selector %s matches no pod template rendered with it", s)
		}
	}
	return problems
}

func selected(s labels.Selector, namespace string, templates []podTemplate) []podTemplate {
	var out []podTemplate
	for _, t := range templates {
		if t.owner.meta.GetNamespace() == namespace && s.Matches(labels.Set(t.spec.Labels)) {
			out = append(out, t)
		}
	}
	return out
}

func labelProblems(o object, field string, set map[string]string) []string {
	var problems []string
	for k, v := range set {
		for _, e := range validation.IsQualifiedName(k) {
			problems = append(problems, fmt.Sprintf("%s: %s key %q: %s", o, field, k, e))
		}
		for _, e := range validation.IsValidLabelValue(v) {
			problems = append(problems, fmt.Sprintf("%s: %s %q value %q: %s", o, field, k, v, e))
		}
	}
	return problems
}

// servicePortProblems: a Service's named targetPort must be a port some selected container names.
func servicePortProblems(o object, svc *corev1.Service, templates []podTemplate) []string {
	var problems []string
	pods := selected(labels.SelectorFromSet(svc.Spec.Selector), o.meta.GetNamespace(), templates)
	for _, port := range svc.Spec.Ports {
		if port.TargetPort.Type != intstr.String { // a number: nothing to look up
			continue
		}
		name := port.TargetPort.StrVal
		found := false
		for _, t := range pods {
			for _, c := range t.spec.Spec.Containers {
				for _, p := range c.Ports {
					found = found || p.Name == name
				}
			}
		}
		if !found && len(pods) > 0 {
			problems = append(problems, fmt.Sprintf("%s: port %q targets %q, which no selected container names", o, port.Name, name))
		}
	}
	return problems
}

func podProblems(o object, pod *corev1.PodSpec) []string {
	var problems []string
	fail := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf("%s: %s", o, fmt.Sprintf(format, args...)))
	}
	volumes := map[string]bool{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = true
	}
	if len(pod.Containers) == 0 {
		fail("the pod has no containers")
	}
	all := append(append([]corev1.Container{}, pod.InitContainers...), pod.Containers...)
	for _, c := range all {
		if c.Image == "" {
			fail("container %q has no image", c.Name)
		}
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				fail("container %q mounts %q, which is not a volume of the pod", c.Name, m.Name)
			}
		}
		ports := map[string]bool{}
		for _, p := range c.Ports {
			ports[p.Name] = true
		}
		for what, probe := range map[string]*corev1.Probe{
			"livenessProbe": c.LivenessProbe, "readinessProbe": c.ReadinessProbe, "startupProbe": c.StartupProbe,
		} {
			if probe == nil {
				continue
			}
			var named string
			switch {
			case probe.HTTPGet != nil && probe.HTTPGet.Port.Type == intstr.String:
				named = probe.HTTPGet.Port.StrVal
			case probe.TCPSocket != nil && probe.TCPSocket.Port.Type == intstr.String:
				named = probe.TCPSocket.Port.StrVal
			}
			if named != "" && !ports[named] {
				fail("container %q %s uses port %q, which the container does not name", c.Name, what, named)
			}
			handlers := 0
			for _, set := range []bool{probe.Exec != nil, probe.HTTPGet != nil, probe.TCPSocket != nil, probe.GRPC != nil} {
				if set {
					handlers++
				}
			}
			if handlers != 1 {
				fail("container %q %s must have exactly one handler, has %d", c.Name, what, handlers)
			}
			if probe.GRPC != nil && (probe.GRPC.Port < 1 || probe.GRPC.Port > 65535) {
				fail("container %q %s grpc.port %d is not a port", c.Name, what, probe.GRPC.Port)
			}
		}
	}
	return problems
}
